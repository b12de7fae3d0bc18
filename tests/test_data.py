"""Bundled data, loader errors, task registry, prompt text, tokenisation and collation."""

import gzip
import hashlib
import json
import re

import pytest
import torch

from omoe.data import (
    IGNORE_INDEX,
    TASK_NAMES,
    TASKS,
    DataFormatError,
    build_prompt,
    bundled_file,
    collate,
    get_task,
    load_records,
    load_task,
    mix_tasks,
    parse_task_list,
    tokenize_dataset,
    tokenize_example,
)
from omoe.data.loader import DATA_DIR
from omoe.errors import ConfigError

# Record counts of the bundled files (the table in src/omoe/data/commonsense/README.md).
EXPECTED_COUNTS = {
    ("ARC-Challenge", "train"): 1119,
    ("ARC-Challenge", "test"): 1172,
    ("ARC-Easy", "train"): 2251,
    ("ARC-Easy", "test"): 2376,
    ("boolq", "train"): 9427,
    ("boolq", "test"): 3270,
    ("openbookqa", "train"): 4957,
    ("openbookqa", "test"): 500,
    ("piqa", "test"): 1838,
    ("hellaswag", "test"): 10042,
    ("social_i_qa", "sample"): 50,
    ("winogrande", "sample"): 50,
}

RECORD = {
    "instruction": "Please answer the following question with true or false, question: is water wet?\n\nAnswer format: true/false",
    "input": "",
    "output": "the correct answer is true",
    "answer": "true",
}


# ------------------------------------------------------------------ bundled files
def test_registry_lists_exactly_the_bundled_task_splits():
    bundled = {(p.parent.name, p.name.removesuffix(".json.gz")) for p in DATA_DIR.glob("*/*.json.gz")}
    registered = {(name, split) for name, task in TASKS.items() for split in task.splits}
    assert bundled == registered == set(EXPECTED_COUNTS)


@pytest.mark.parametrize(("task", "split"), sorted(EXPECTED_COUNTS))
def test_bundled_file_loads_with_expected_count_and_answers_in_label_set(task, split):
    records = load_task(task, split)
    assert len(records) == EXPECTED_COUNTS[task, split]
    labels = set(get_task(task).labels)
    assert {r["answer"] for r in records} <= labels
    # every bundled output is "the correct answer is <answer>", which the label protocol relies on
    assert all(r["output"] == f"the correct answer is {r['answer']}" for r in records)


def test_bundled_files_decompress_to_the_checksums_in_the_data_readme():
    readme = (DATA_DIR / "README.md").read_text()
    sums = dict((path, digest) for digest, path in re.findall(r"^([0-9a-f]{64})  (\S+\.json)$", readme, re.M))
    assert len(sums) == len(EXPECTED_COUNTS)
    for (task, split), _ in EXPECTED_COUNTS.items():
        data = gzip.decompress(bundled_file(task, split).read_bytes())
        assert hashlib.sha256(data).hexdigest() == sums[f"{task}/{split}.json"], (task, split)


def test_licence_file_is_bundled_beside_the_data():
    assert "Open Data Commons Attribution License" in (DATA_DIR / "DATA_LICENSE").read_text()


# ------------------------------------------------------------------ task registry
def test_unknown_task_error_lists_every_valid_name():
    with pytest.raises(ConfigError) as err:
        get_task("arc-easy")
    message = str(err.value)
    assert "'arc-easy'" in message and all(name in message for name in TASK_NAMES)


def test_parse_task_list_rejects_duplicates_and_blanks():
    assert [t.name for t in parse_task_list("ARC-Easy, boolq")] == ["ARC-Easy", "boolq"]
    with pytest.raises(ConfigError, match="twice"):
        parse_task_list("boolq,boolq")
    with pytest.raises(ConfigError, match="empty task name"):
        parse_task_list("boolq,")


def test_unknown_split_error_names_the_bundled_splits():
    with pytest.raises(ConfigError, match=r"piqa has no bundled split 'train'; bundled: test"):
        bundled_file("piqa", "train")


def test_label_sets_match_llm_adapters():
    assert get_task("boolq").labels == ("true", "false")
    assert get_task("piqa").labels == ("solution1", "solution2")
    assert get_task("social_i_qa").labels == ("answer1", "answer2", "answer3")
    assert get_task("ARC-Challenge").labels == tuple(f"answer{i}" for i in range(1, 6))
    assert get_task("openbookqa").labels == tuple(f"answer{i}" for i in range(1, 5))
    assert get_task("hellaswag").labels == tuple(f"ending{i}" for i in range(1, 5))
    assert get_task("winogrande").labels == ("option1", "option2")


@pytest.mark.parametrize(
    ("task", "text", "expected"),
    [
        ("ARC-Easy", "the correct answer is answer3, not answer1", "answer3"),  # first match wins
        ("ARC-Easy", "answer2answer4", "answer2"),
        ("openbookqa", "the correct answer is answer5", "answer5"),  # LLM-Adapters' shared regex
        ("boolq", "It is false that this is true", "false"),
        ("boolq", "True", None),  # the upstream regex is case-sensitive
        ("piqa", "solution 1", None),
        ("hellaswag", "  ending4\n", "ending4"),
        ("winogrande", "option2 option1", "option2"),
        ("social_i_qa", "", None),
    ],
)
def test_extract_returns_first_regex_match_or_none(task, text, expected):
    assert get_task(task).extract(text) == expected


# ------------------------------------------------------------------ loader errors
def _write(path, payload: str):
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(payload.encode()))
    else:
        path.write_text(payload)
    return path


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ('[{"instruction": "x",', r"invalid JSON at line 1 column"),
        ('{"instruction": "x"}', r"expected a JSON list of records, got a dict"),
        (json.dumps([RECORD, "text"]), r"record 1: expected an object"),
        (
            json.dumps([RECORD, RECORD, {k: v for k, v in RECORD.items() if k != "answer"}]),
            r"record 2: missing field 'answer'",
        ),
        (json.dumps([{**RECORD, "input": None}]), r"record 0: field 'input' must be a string, got NoneType"),
        (
            json.dumps([RECORD, {**RECORD, "answer": "maybe"}]),
            r"record 1: answer 'maybe' is not a boolq label \(true/false\)",
        ),
    ],
)
@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_malformed_file_error_names_file_record_and_problem(tmp_path, payload, expected, suffix):
    path = _write(tmp_path / f"bad{suffix}", payload)
    with pytest.raises(DataFormatError, match=expected) as err:
        load_records(path, task="boolq")
    assert str(err.value).startswith(f"{path}: ")
    assert "\n" not in str(err.value)


def test_answer_outside_labels_is_accepted_without_a_task(tmp_path):
    path = _write(tmp_path / "free.json", json.dumps([{**RECORD, "answer": "maybe"}]))
    assert load_records(path)[0]["answer"] == "maybe"


def test_missing_file_and_wrong_suffix_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_records(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match=r"must end in \.json or \.json\.gz"):
        load_records(_write(tmp_path / "data.jsonl", "[]"))


def test_corrupt_gzip_is_a_data_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.json.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataFormatError, match=re.escape(str(path))):
        load_records(path)


def test_load_task_limit_keeps_the_first_records_in_file_order():
    full = load_task("boolq", "test")
    assert load_task("boolq", "test", limit=5) == full[:5]
    with pytest.raises(ConfigError, match="limit must be a positive integer"):
        load_task("boolq", "test", limit=0)


def test_load_task_reads_a_user_file_validated_against_the_task(tmp_path):
    path = _write(tmp_path / "siqa.json", json.dumps([{**RECORD, "answer": "answer3", "output": "x"}]))
    assert len(load_task("social_i_qa", data_file=path)) == 1
    with pytest.raises(DataFormatError, match="not a boolq label"):
        load_task("boolq", data_file=path)


# ------------------------------------------------------------------ multi-task mixing
def test_mix_tasks_is_deterministic_tagged_and_seed_dependent():
    a = mix_tasks(["boolq", "ARC-Easy", "openbookqa"], "train", seed=1, limit_per_task=30)
    b = mix_tasks(["boolq", "ARC-Easy", "openbookqa"], "train", seed=1, limit_per_task=30)
    c = mix_tasks(["boolq", "ARC-Easy", "openbookqa"], "train", seed=2, limit_per_task=30)
    assert a == b
    assert a != c
    assert sorted(r["task"] for r in a) == ["ARC-Easy"] * 30 + ["boolq"] * 30 + ["openbookqa"] * 30
    assert {r["task"] for r in a[:15]} != {"boolq"}  # interleaved, not concatenated


def test_mix_tasks_without_limit_keeps_every_record():
    mixed = mix_tasks(["ARC-Challenge", "ARC-Easy"], "train", seed=0)
    assert len(mixed) == 1119 + 2251


def test_mix_tasks_rejects_a_task_without_the_split():
    with pytest.raises(ConfigError, match="piqa has no bundled split 'train'"):
        mix_tasks(["boolq", "piqa"], "train", seed=0)


# ------------------------------------------------------------------ prompt template
def test_prompt_without_input_is_the_exact_alpaca_text():
    assert build_prompt({"instruction": "Q?", "input": "", "output": "A"}, with_output=True) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nQ?\n\n### Response:\nA"
    )


def test_prompt_with_input_is_the_exact_alpaca_text():
    assert build_prompt({"instruction": "Q?", "input": "ctx", "output": "A"}, with_output=True) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nQ?\n\n### Input:\nctx"
        "\n\n### Response:\nA"
    )


def test_prompt_without_output_ends_right_after_the_response_header():
    prompt = build_prompt({**RECORD, "instruction": "use {braces} {output}"}, with_output=False)
    assert prompt.endswith("### Instruction:\nuse {braces} {output}\n\n### Response:\n")


# ------------------------------------------------------------------ tokenisation
def test_labels_mask_exactly_the_prompt_and_keep_response_plus_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ex = tokenize_example(tok, RECORD)
    n_prompt = len(tok(build_prompt(RECORD, with_output=False))["input_ids"])
    assert (ex["labels"][:n_prompt] == IGNORE_INDEX).all()
    assert torch.equal(ex["labels"][n_prompt:], ex["input_ids"][n_prompt:])
    assert tok.decode(ex["labels"][n_prompt:]) == "the correct answer is true<|im_end|>"
    assert ex["input_ids"][-1].item() == tok.eos_token_id
    assert ex["attention_mask"].tolist() == [1] * ex["input_ids"].numel()
    assert ex["truncated"] is False


def test_train_on_inputs_keeps_every_label(smollm2_tokenizer):
    ex = tokenize_example(smollm2_tokenizer, RECORD, train_on_inputs=True)
    assert torch.equal(ex["labels"], ex["input_ids"])


@pytest.mark.parametrize("task", ["ARC-Challenge", "boolq", "openbookqa", "piqa", "hellaswag", "winogrande"])
def test_separate_prompt_response_tokenisation_equals_full_text_tokenisation(smollm2_tokenizer, task):
    tok = smollm2_tokenizer
    records = load_task(task, limit=50)
    examples = tokenize_dataset(tok, records, cutoff_len=4096).examples
    full = tok([build_prompt(r, with_output=True) for r in records])["input_ids"]
    for ex, ids in zip(examples, full):
        assert ex["input_ids"][:-1].tolist() == ids


def test_truncation_cuts_at_cutoff_and_counts_truncated_examples(smollm2_tokenizer):
    tok = smollm2_tokenizer
    records = [RECORD, {**RECORD, "instruction": "short"}, {**RECORD, "instruction": "word " * 200}]
    lengths = [e["input_ids"].numel() for e in tokenize_dataset(tok, records, cutoff_len=10_000).examples]
    cutoff = sorted(lengths)[1]  # the middle length: exactly one example is longer
    data = tokenize_dataset(tok, records, cutoff_len=cutoff)
    assert data.num_truncated == 1
    assert [e["truncated"] for e in data.examples] == [n > cutoff for n in lengths]
    assert max(e["input_ids"].numel() for e in data.examples) == cutoff
    assert all(
        e["labels"].numel() == e["input_ids"].numel() == e["attention_mask"].numel() for e in data.examples
    )


def test_tokenize_rejects_non_positive_cutoff(smollm2_tokenizer):
    with pytest.raises(ConfigError, match="cutoff_len must be a positive integer"):
        tokenize_dataset(smollm2_tokenizer, [RECORD], cutoff_len=0)


def test_collate_right_pads_with_pad_id_zero_mask_and_ignored_labels():
    a = {
        "input_ids": torch.tensor([5, 6, 7]),
        "labels": torch.tensor([-100, 6, 7]),
        "attention_mask": torch.ones(3, dtype=torch.long),
    }
    b = {
        "input_ids": torch.tensor([8]),
        "labels": torch.tensor([8]),
        "attention_mask": torch.ones(1, dtype=torch.long),
    }
    batch = collate([a, b], pad_token_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert collate([a, b], pad_token_id=2, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)
