"""Bundled data, loader errors, task registry, prompt text, tokenisation and collation."""

import gzip
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from omoe.cli.main import main
from omoe.data import (
    IGNORE_INDEX,
    PROMPT_FORMATS,
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
    render,
    tokenize_dataset,
    tokenize_example,
    val_indices,
)
from omoe.data.loader import DATA_DIR
from omoe.data.prompts import render_many
from omoe.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
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
    ("piqa", "train"): 16113,
    ("piqa", "test"): 1838,
    ("hellaswag", "train"): 3368,
    ("hellaswag", "test"): 10042,
    ("social_i_qa", "train"): 33410,
    ("social_i_qa", "sample"): 50,
    ("winogrande", "train"): 9248,
    ("winogrande", "sample"): 50,
}


def _whole_file(task: str, file: str) -> list[dict]:
    """Every record of a bundled file (the train split leaves out the val slice)."""
    return load_task(task, "train+val" if file == "train" else file)


RECORD = {
    "instruction": "Please answer the following question with true or false, question: is water wet?\n\nAnswer format: true/false",
    "input": "",
    "output": "the correct answer is true",
    "answer": "true",
}


# ------------------------------------------------------------------ bundled files
def test_registry_lists_exactly_the_bundled_task_files():
    bundled = {(p.parent.name, p.name.removesuffix(".json.gz")) for p in DATA_DIR.glob("*/*.json.gz")}
    registered = {(name, file) for name, task in TASKS.items() for file in task.files}
    assert bundled == registered == set(EXPECTED_COUNTS)
    assert all(
        t.splits == (*t.files, "val", "train+val") for t in TASKS.values()
    )  # every task has a train file


@pytest.mark.parametrize(("task", "split"), sorted(EXPECTED_COUNTS))
def test_bundled_file_loads_with_expected_count_and_answers_in_label_set(task, split):
    records = _whole_file(task, split)
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
    with pytest.raises(
        ConfigError, match=r"winogrande has no bundled split 'test'; bundled: train, sample, val, train\+val"
    ):
        bundled_file("winogrande", "test")
    with pytest.raises(ConfigError, match="has no bundled split 'dev'"):
        load_task("boolq", "dev")


# ------------------------------------------------------------------ val split
@pytest.mark.parametrize("task", TASK_NAMES)
def test_val_is_a_seeded_slice_of_the_train_file_that_train_leaves_out(task):
    whole, train, val = (load_task(task, s) for s in ("train+val", "train", "val"))
    n = len(whole)
    picked = set(val_indices(n))
    assert len(val) == min(500, n // 10)
    assert val == [r for i, r in enumerate(whole) if i in picked]  # file order
    seen = {r["instruction"] for r in val}
    # train: the rest, less the official files' few exact duplicates of a val question
    assert train == [r for i, r in enumerate(whole) if i not in picked and r["instruction"] not in seen]
    assert len(train) + len(val) >= n - 1
    assert bundled_file(task, "val") == bundled_file(task, "train+val") == bundled_file(task, "train")


def test_val_indices_are_fixed_for_good():
    # The slice must never move: a model tuned on val would otherwise have trained on it.
    assert val_indices(1119)[:8] == [2, 28, 33, 54, 67, 79, 82, 92]
    assert len(val_indices(9427)) == 500 and val_indices(9427) == sorted(set(val_indices(9427)))
    assert val_indices(9) == []  # under 10 records: no val slice


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
    with pytest.raises(ConfigError, match="limit must be an integer >= 1"):
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


def test_mix_tasks_without_limit_keeps_every_record_of_the_split():
    assert len(mix_tasks(["ARC-Challenge", "ARC-Easy"], "train", seed=0)) == (1119 - 111) + (2251 - 225)
    assert len(mix_tasks(["ARC-Challenge", "ARC-Easy"], "train+val", seed=0)) == 1119 + 2251
    val = mix_tasks(["openbookqa", "social_i_qa"], "val", seed=0)
    train = mix_tasks(["openbookqa", "social_i_qa"], "train", seed=0)
    assert len(val) == 495 + 500 and not {r["instruction"] for r in val} & {r["instruction"] for r in train}


def test_mix_tasks_rejects_a_task_without_the_split():
    with pytest.raises(ConfigError, match="boolq has no bundled split 'sample'"):
        mix_tasks(["winogrande", "boolq"], "sample", seed=0)


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
    with pytest.raises(ConfigError, match="cutoff_len must be an integer >= 1"):
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


# ------------------------------------------------------------------ prompt formats
def _record(instruction: str, answer: str) -> dict:
    return {
        "instruction": instruction,
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


ALPACA_HEAD = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n"
)
ALPACA_TAIL = "\n\n### Response:\n"

# One record per task, in LLM-Adapters' wording, and its MoE-PEFT rendering (moe_peft/tasks/qa_tasks.py).
RENDERED = {
    "boolq": (
        _record("Please answer the following question with true or false, question: is the sky blue?\n\n"
                "Answer format: true/false", "true"),
        "Please answer the following question with true or false: is the sky blue?\nAnswer:", " true",
    ),
    "piqa": (
        _record("Please choose the correct solution to the question: Open a jar.\n\nSolution1: twist the lid\n\n"
                "Solution2: eat the lid\n\nAnswer format: solution1/solution2", "solution1"),
        "Below is a common task along with two possible solutions labeled (A) and (B). Please select the "
        "appropriate solution to achieve the task:\nOpen a jar.\n\n(A) twist the lid\n(B) eat the lid\n\n"
        "Correct solution:", " A",
    ),
    "social_i_qa": (
        _record("Please choose the correct answer to the question: Kai fell. How does Kai feel?\n\nAnswer1: hurt "
                "Answer2: proud Answer3: bored\n\nAnswer format: answer1/answer2/answer3", "answer1"),
        "Please choose the correct answer to the question.\nQuestion: Kai fell. How does Kai feel?\n(A) hurt\n"
        "(B) proud\n(C) bored\nAnswer:", " A",
    ),
    "ARC-Challenge": (
        _record("Please choose the correct answer to the question: Which is a gas?\n\nAnswer1: ice Answer2: steam "
                "Answer3: rock Answer4: wood\n\nAnswer format: answer1/answer2/answer3/answer4", "answer2"),
        "Please choose the correct answer to the question: Which is a gas? (A) ice (B) steam (C) rock (D) wood"
        "\nAnswer:", " B",
    ),
    "ARC-Easy": (
        _record("Please choose the correct answer to the question: 2 + 2?\n\nAnswer1: 3 Answer2: 4 Answer3: 5\n\n"
                "Answer format: answer1/answer2/answer3", "answer3"),
        "Please choose the correct answer to the question: 2 + 2? (A) 3 (B) 4 (C) 5\nAnswer:", " C",
    ),
    "openbookqa": (
        _record("Please choose the correct answer to the question: Plants need\n\nAnswer1: light Answer2: noise "
                "Answer3: plastic Answer4: salt\n\nAnswer format: answer1/answer2/answer3/answer4", "answer1"),
        "Please choose the correct answer to the question: Plants need (A) light (B) noise (C) plastic (D) salt"
        "\nAnswer:", " A",
    ),
    "hellaswag": (
        _record("Please choose the correct ending to complete the given sentence: Baking: A man opens the oven. "
                "he\n\nEnding1: takes out a cake. Ending2: flies away. Ending3: sings. Ending4: melts.\n\n"
                "Answer format: ending1/ending2/ending3/ending4", "ending1"),
        "Please choose the correct ending to complete the given sentence.\nSentence: Baking. A man opens the "
        "oven. he\n(A) takes out a cake.\n(B) flies away.\n(C) sings.\n(D) melts.\nAnswer:", " A",
    ),
    "winogrande": (
        _record("Please choose the correct answer to fill in the blank to complete the given sentence: The cup "
                "fell off the table because the _ was slippery.\n\nOption1: cup Option2: table "
                "Answer format: option1/option2", "option2"),
        "Please choose the correct answer to fill in the blank to complete the given sentence.\nSentence: The "
        "cup fell off the table because the _ was slippery.\n(A) cup\n(B) table\nAnswer:", " B",
    ),
}  # fmt: skip


def test_prompt_formats_are_alpaca_and_moe_peft():
    assert PROMPT_FORMATS == ("alpaca", "moe-peft")
    assert set(RENDERED) == set(TASK_NAMES)
    with pytest.raises(ConfigError, match="unknown prompt format 'mixlora'; allowed: alpaca, moe-peft"):
        render(RENDERED["boolq"][0], "boolq", "mixlora")


@pytest.mark.parametrize("task", TASK_NAMES)
def test_one_record_of_every_task_rendered_in_both_formats(task):
    record, moe_peft_prompt, moe_peft_target = RENDERED[task]
    assert render(record, task, "alpaca") == (
        ALPACA_HEAD + record["instruction"] + ALPACA_TAIL,
        f"the correct answer is {record['answer']}",
    )
    assert render(record, task, "moe-peft") == (moe_peft_prompt, moe_peft_target)


@pytest.mark.parametrize(("task", "file"), sorted(EXPECTED_COUNTS))
def test_every_bundled_record_renders_in_the_moe_peft_format(task, file):
    records = _whole_file(task, file)
    prompts, targets = render_many(records, task, "moe-peft")
    letters = ("true", "false") if task == "boolq" else "ABCDE"
    for record, prompt, target in zip(records, prompts, targets):
        assert target == " " + letters[get_task(task).labels.index(record["answer"])]
        assert prompt.endswith(("\nAnswer:", "\n\nCorrect solution:"))
        assert "Answer format" not in prompt and "Answer1:" not in prompt and "Option1:" not in prompt


def test_moe_peft_render_errors_name_the_task_record_and_problem():
    good = RENDERED["ARC-Easy"][0]
    reworded = {**good, "instruction": good["instruction"].replace("Please choose", "Choose")}
    with pytest.raises(
        DataFormatError, match=r"ARC-Easy record 1: the instruction does not start with ARC-Easy's"
    ):
        render_many([good, reworded], "ARC-Easy", "moe-peft")
    unlisted = {**good, "answer": "answer4"}  # a valid ARC label, but the record lists three choices
    with pytest.raises(DataFormatError, match=r"record 0: answer 'answer4' is not among the listed choices"):
        render_many([unlisted], "ARC-Easy", "moe-peft")
    with pytest.raises(ConfigError, match="needs each record's task"):
        render_many([good], None, "moe-peft")
    assert render_many([good], None, "alpaca")[1] == ["the correct answer is answer3"]  # alpaca needs no task


def test_moe_peft_examples_supervise_the_label_token_only_without_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    for task, (record, prompt, target) in RENDERED.items():
        ex = tokenize_example(tok, record, prompt="moe-peft", task=task)
        n_prompt = len(tok(prompt)["input_ids"])
        assert ex["input_ids"].numel() == n_prompt + 1  # one label token, no EOS
        assert (ex["labels"][:n_prompt] == IGNORE_INDEX).all()
        assert tok.decode(ex["labels"][n_prompt:]) == target
        assert ex["input_ids"].tolist() == tok(prompt + target)["input_ids"]  # as the joined text tokenises
        on_inputs = tokenize_example(tok, record, prompt="moe-peft", task=task, train_on_inputs=True)
        assert torch.equal(on_inputs["labels"], on_inputs["input_ids"])


def test_mixture_records_carry_their_own_task_into_the_moe_peft_prompt(smollm2_tokenizer):
    mixed = mix_tasks(["boolq", "piqa"], "train", seed=0, limit_per_task=3)
    data = tokenize_dataset(smollm2_tokenizer, mixed, prompt="moe-peft")
    for record, ex in zip(mixed, data.examples):
        start = "Please answer" if record["task"] == "boolq" else "Below is a common task"
        assert smollm2_tokenizer.decode(ex["input_ids"]).startswith(start)


# ------------------------------------------------------------------ the prompt option of train and quickstart
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--prompt", "mixlora"], "unknown data.prompt 'mixlora'; allowed: alpaca, moe-peft"),
        (["train", "--data.split", "val"], "unknown data.split 'val'; allowed: train, train+val"),
        (["train", "--data-file", "x.json", "--task", "boolq", "--data.split", "train+val"], "data.split applies"),
        (["quickstart", "--prompt", "moe-peft", "--protocol", "generate"],
         "protocol generate reads the alpaca prompt only; with prompt moe-peft use protocol label"),
    ],
)  # fmt: skip
def test_bad_prompt_options_exit_2_with_one_line(capsys, args, message):
    try:
        rc = main([*args, "--print-config"] if args[0] == "train" else args)
    except SystemExit as exit_:
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err


def test_train_prompt_flag_sets_data_prompt(capsys):
    args = [
        "train",
        "--config",
        str(ROOT / "configs" / "fast.yaml"),
        "--prompt",
        "moe-peft",
        "--print-config",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "  prompt: moe-peft\n" in text and "  split: train\n" in text
