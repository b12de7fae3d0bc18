"""Evaluation protocols on tiny random LLaMAs and scripted stub models, and the ``omoe eval`` CLI."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from omoe.cli.main import main
from omoe.data import TASKS, build_prompt, get_task, load_task, parse_fields, render, tokenize_example
from omoe.errors import ConfigError
from omoe.eval import (
    GenerateProtocol,
    continuation_logprobs,
    evaluate,
    label_tokens,
    parse_choices,
    predictions_path,
)
from omoe.eval.evaluate import get_protocol
from omoe.eval.label import response_tokens
from omoe.eval.loglik import pick_choices
from omoe.models.testing import tiny_llama

# A wide initialisation spreads the random logits, so greedy decoding has no near-ties that float
# rounding could flip; a batching bug (wrong positions or mask) still changes the tokens.
WIDE = {"initializer_range": 0.5}


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=0, **WIDE)


def _records(task, n):
    return load_task(task, limit=n)


# ------------------------------------------------------------------ generate
def test_batched_generation_equals_batch_size_one(tiny, smollm2_tokenizer):
    tok = smollm2_tokenizer
    texts = [
        "Hi",
        "A much longer prompt, with several more words in it, to force padding.",
        "Mid-sized prompt here",
    ]
    texts += [build_prompt(r, with_output=False) for r in _records("boolq", 3) + _records("ARC-Easy", 3)]
    prompts = tok(texts)["input_ids"]
    assert len({len(p) for p in prompts}) >= 8  # lengths 1 to ~100 tokens: batches really are padded
    protocol = GenerateProtocol(max_new_tokens=6)
    with torch.inference_mode():
        single = protocol.generate_ids(tiny, tok, prompts, batch_size=1)
        batched = protocol.generate_ids(tiny, tok, prompts, batch_size=4)
        whole = protocol.generate_ids(tiny, tok, prompts, batch_size=len(prompts))
    assert batched == single
    assert whole == single
    assert all(len(ids) == 6 or ids[-1] == tok.eos_token_id for ids in single)


class ScriptedGenerator(nn.Module):
    """Stub whose ``generate`` appends a scripted reply, chosen by the instruction found in the prompt."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.tokenizer, self.replies = tokenizer, replies

    def generate(self, input_ids, attention_mask, generation_config):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            reply = next(r for key, r in self.replies.items() if key in prompt)
            rows.append(
                self.tokenizer(reply, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            )
        longest = max(len(r) for r in rows)
        new = torch.tensor([r + [self.tokenizer.pad_token_id] * (longest - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_generate_scores_first_regex_match_and_counts_no_match(smollm2_tokenizer):
    records = _records("ARC-Easy", 4)
    replies = [
        f"the correct answer is {records[0]['answer']}",  # right
        "answer9 then answer2 and answer1",  # first valid match answer2
        "I do not know",  # no match
        f"{records[3]['answer']} or maybe answer1",  # first match is the right one
    ]
    stub = ScriptedGenerator(
        smollm2_tokenizer, {r["instruction"]: reply for r, reply in zip(records, replies)}
    )
    metrics, predictions = evaluate(
        stub, smollm2_tokenizer, "ARC-Easy", records, "generate", 3, progress=False
    )
    assert [p["prediction"] for p in predictions] == [
        records[0]["answer"],
        "answer2",
        None,
        records[3]["answer"],
    ]
    assert [p["generation"] for p in predictions] == replies
    assert metrics["no_match"] == 1
    assert metrics["correct"] == 2 + (records[1]["answer"] == "answer2")
    assert metrics["accuracy"] == metrics["correct"] / 4
    assert metrics["protocol"] == "generate" and metrics["n"] == 4


# ------------------------------------------------------------------ label
def test_label_tokens_use_the_first_distinguishing_token_after_the_shared_prefix(smollm2_tokenizer):
    tok = smollm2_tokenizer
    prefix, ids = label_tokens(tok, get_task("ARC-Easy").labels)
    assert tok.decode(prefix) == "the correct answer is answer"
    assert [tok.decode([i]) for i in ids] == ["1", "2", "3", "4", "5"]
    prefix, ids = label_tokens(tok, get_task("boolq").labels)
    assert tok.decode(prefix) == "the correct answer is"
    assert [tok.decode([i]) for i in ids] == [" true", " false"]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_label_position_is_where_the_training_sequence_holds_the_answer_token(smollm2_tokenizer, task):
    tok = smollm2_tokenizer
    prefix, ids = label_tokens(tok, get_task(task).labels)
    token_of = dict(zip(get_task(task).labels, ids))
    for record in _records(task, 20):
        ex = tokenize_example(tok, record, cutoff_len=4096)
        n_prompt = len(tok(build_prompt(record, with_output=False))["input_ids"])
        assert ex["input_ids"][n_prompt : n_prompt + len(prefix)].tolist() == prefix
        assert ex["input_ids"][n_prompt + len(prefix)].item() == token_of[record["answer"]]


def test_label_tokens_reject_labels_one_token_cannot_tell_apart(smollm2_tokenizer):
    with pytest.raises(ConfigError, match="not distinguishable"):
        label_tokens(smollm2_tokenizer, ("answer1", "answer1 more"))


class ScriptedLogits(nn.Module):
    """Stub LM: at each row's last real token, label ``want`` gets logit 5 and a non-label token 50;
    at every other position a wrong label gets logit 100 (so scoring the wrong position is caught)."""

    def __init__(self, tokenizer, wanted: dict[str, int], label_ids, vocab):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.tokenizer, self.wanted, self.label_ids, self.vocab = tokenizer, wanted, label_ids, vocab

    def forward(self, input_ids, attention_mask):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            last = int(attention_mask[b].sum()) - 1
            text = self.tokenizer.decode(input_ids[b, : last + 1])
            want = next(v for key, v in self.wanted.items() if key in text)
            logits[b, :, self.label_ids[(want + 1) % len(self.label_ids)]] = 100.0
            logits[b, last] = 0.0
            logits[b, last, self.label_ids[want]] = 5.0
            logits[b, last, 7] = 50.0  # token 7 is no label
        return SimpleNamespace(logits=logits)


def test_label_protocol_picks_the_argmax_label_at_the_last_real_token(smollm2_tokenizer):
    tok = smollm2_tokenizer
    task = get_task("ARC-Challenge")
    records = _records("ARC-Challenge", 5)
    _, label_ids = label_tokens(tok, task.labels)
    wanted = {r["instruction"]: i % 4 for i, r in enumerate(records)}
    stub = ScriptedLogits(tok, wanted, label_ids, vocab=len(tok))
    metrics, predictions = evaluate(stub, tok, task, records, "label", batch_size=2, progress=False)
    assert [p["prediction"] for p in predictions] == [task.labels[i % 4] for i in range(5)]
    assert metrics["correct"] == sum(r["answer"] == task.labels[i % 4] for i, r in enumerate(records))
    assert metrics["no_match"] == 0


@pytest.mark.parametrize("task", sorted(TASKS))
def test_moe_peft_label_tokens_are_single_tokens_that_training_supervises(smollm2_tokenizer, task):
    tok, t = smollm2_tokenizer, get_task(task)
    prefix, ids = response_tokens(tok, [" " + name for name in ("true", "false")] if task == "boolq" else
                                  [f" {letter}" for letter in "ABCDE"[: len(t.labels)]])  # fmt: skip
    assert prefix == []  # the label is the first target token: scored right after the prompt
    token_of = dict(zip(t.labels, ids))
    for record in _records(task, 20):
        prompt, target = render(record, task, "moe-peft")
        assert len(tok(target, add_special_tokens=False)["input_ids"]) == 1
        ex = tokenize_example(tok, record, cutoff_len=4096, prompt="moe-peft", task=task)
        n_prompt = len(tok(prompt)["input_ids"])
        supervised = (ex["labels"] != -100).nonzero().flatten().tolist()
        assert supervised == [n_prompt] and ex["input_ids"][n_prompt].item() == token_of[record["answer"]]


def test_label_protocol_reads_the_moe_peft_prompt_and_keeps_canonical_answers(smollm2_tokenizer):
    tok = smollm2_tokenizer
    task = get_task("ARC-Challenge")
    records = _records("ARC-Challenge", 5)
    _, label_ids = response_tokens(tok, [" A", " B", " C", " D", " E"])
    wanted = {parse_fields(task, r["instruction"]).question: i % 4 for i, r in enumerate(records)}
    stub = ScriptedLogits(tok, wanted, label_ids, vocab=len(tok))
    metrics, predictions = evaluate(
        stub, tok, task, records, "label", batch_size=2, progress=False, prompt="moe-peft"
    )
    assert [p["prediction"] for p in predictions] == [task.labels[i % 4] for i in range(5)]
    assert all(p["answer"] == r["answer"] for p, r in zip(predictions, records))
    assert [p["gold_label"] for p in predictions] == [
        "ABCDE"[task.labels.index(r["answer"])] for r in records
    ]
    assert all(list(p["scores"]) == list("ABCDE") and p["prompt"] == "moe-peft" for p in predictions)
    assert metrics["prompt"] == "moe-peft" and metrics["protocol"] == "label"
    assert metrics["correct"] == sum(r["answer"] == task.labels[i % 4] for i, r in enumerate(records))


def test_only_the_label_protocol_reads_the_moe_peft_prompt():
    assert get_protocol("label", prompt="moe-peft").prompt == "moe-peft"
    for protocol in ("generate", "loglik"):
        with pytest.raises(ConfigError, match=f"protocol {protocol} reads the alpaca prompt only; with prompt "
                           "moe-peft use protocol label"):  # fmt: skip
            get_protocol(protocol, prompt="moe-peft")
    with pytest.raises(ConfigError, match="unknown prompt format 'raw'; allowed: alpaca, moe-peft"):
        get_protocol("label", prompt="raw")


def test_label_protocol_is_batch_invariant_on_a_real_model(tiny, smollm2_tokenizer):
    records = _records("boolq", 4) + _records("boolq", 12)[8:]
    _, p1 = evaluate(tiny, smollm2_tokenizer, "boolq", records, "label", batch_size=1, progress=False)
    _, p3 = evaluate(tiny, smollm2_tokenizer, "boolq", records, "label", batch_size=3, progress=False)
    assert [p["prediction"] for p in p1] == [p["prediction"] for p in p3]
    for a, b in zip(p1, p3):
        assert_close(
            torch.tensor(list(a["scores"].values())),
            torch.tensor(list(b["scores"].values())),
            rtol=0,
            atol=1e-4,
        )


# ------------------------------------------------------------------ loglik
def test_parse_choices_of_hand_written_instructions():
    assert parse_choices(
        get_task("winogrande"),
        "Fill in: the _ are big.\n\nOption1: books Option2: computers Answer format: option1/option2",
    ) == (["option1", "option2"], ["books", "computers"])
    assert parse_choices(
        get_task("piqa"),
        "Q: Answer1: is not a marker here\n\nSolution1: do a\n\nSolution2: do b\n\nAnswer format: solution1/solution2",
    ) == (["solution1", "solution2"], ["do a", "do b"])
    assert parse_choices(
        get_task("ARC-Easy"), "Q? Answer1: x Answer2: y Answer3: z\n\nAnswer format: answer1/answer2/answer3"
    ) == (
        ["answer1", "answer2", "answer3"],
        ["x", "y", "z"],
    )
    assert parse_choices(get_task("boolq"), "question: is it?\n\nAnswer format: true/false") == (
        ["true", "false"],
        ["true", "false"],
    )


@pytest.mark.parametrize(("task", "file"), sorted((n, f) for n, t in TASKS.items() for f in t.files))
def test_parse_choices_finds_every_listed_choice_in_every_bundled_record(task, file):
    t = get_task(task)
    for i, r in enumerate(load_task(t, "train+val" if file == "train" else file)):
        labels, texts = parse_choices(t, r["instruction"])
        assert r["answer"] in labels, i
        assert all(texts) and len(texts) == len(labels) >= 2, i
        if t.choice_marker:
            assert not any(f"{t.choice_marker}{k}:" in text for text in texts for k in range(1, 6)), i


def test_parse_choices_reports_a_missing_marker():
    from omoe.data import DataFormatError

    with pytest.raises(DataFormatError, match="'Answer2:' not found"):
        parse_choices(get_task("ARC-Easy"), "Q? Answer1: x\n\nAnswer format: answer1/answer2")


class Bigram(nn.Module):
    """Logits at position t depend only on token t: ``table[token]``."""

    def __init__(self, vocab=11, seed=0):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        nn.init.normal_(self.table.weight, generator=torch.Generator().manual_seed(seed))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.table(input_ids))


def test_continuation_logprobs_sum_hand_computed_bigram_logprobs():
    model = Bigram()
    contexts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    continuations = [[4, 5], [6, 7, 8], [10]]
    logp = model.table.weight.detach().double().log_softmax(-1)
    expected = torch.tensor(
        [
            logp[3, 4] + logp[4, 5],
            logp[4, 6] + logp[6, 7] + logp[7, 8],
            logp[9, 10],
        ]
    )
    for batch_size in (1, 2, 3):
        got = continuation_logprobs(
            model, contexts, continuations, pad_id=0, batch_size=batch_size, desc="", progress=False
        )
        assert_close(got, expected, rtol=0, atol=1e-5)


def test_continuation_logprobs_with_padding_match_unpadded_tiny_llama(tiny):
    contexts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    continuations = [[20, 21], [22, 23, 24, 25], [26]]
    expected = []
    with torch.inference_mode():
        for c, x in zip(contexts, continuations):
            ids = torch.tensor([c + x])
            lp = tiny(input_ids=ids).logits[0].double().log_softmax(-1)
            expected.append(sum(lp[len(c) - 1 + j, t] for j, t in enumerate(x)))
        got = continuation_logprobs(
            tiny, contexts, continuations, pad_id=2, batch_size=3, desc="", progress=False
        )
    assert_close(got, torch.stack(expected), rtol=0, atol=1e-4)


def test_acc_norm_divides_by_choice_length_in_characters():
    lls = torch.tensor([-10.0, -12.0], dtype=torch.float64)
    assert pick_choices(lls, ["abcde", "x" * 20]) == (0, 1)  # -10/5 = -2 < -12/20 = -0.6
    assert pick_choices(lls, ["abcde", "x" * 5]) == (0, 0)


def test_loglik_protocol_reports_acc_and_acc_norm(tiny, smollm2_tokenizer):
    records = _records("piqa", 3)
    metrics, predictions = evaluate(
        tiny, smollm2_tokenizer, "piqa", records, "loglik", batch_size=4, progress=False
    )
    assert metrics["acc_norm"] == sum(p["correct_norm"] for p in predictions) / 3
    assert (
        metrics["accuracy"] == sum(p["prediction"] == r["answer"] for p, r in zip(predictions, records)) / 3
    )
    assert all(set(p["loglik"]) == {"solution1", "solution2"} for p in predictions)


# ------------------------------------------------------------------ evaluate()
def test_evaluate_restores_training_mode_and_rejects_bad_arguments(smollm2_tokenizer):
    model = tiny_llama(seed=0).train()
    records = _records("boolq", 2)
    evaluate(model, smollm2_tokenizer, "boolq", records, "label", progress=False)
    assert model.training
    with pytest.raises(ConfigError, match="unknown protocol 'mc'; allowed: generate, label, loglik"):
        evaluate(model, smollm2_tokenizer, "boolq", records, "mc")
    with pytest.raises(ConfigError, match="no records"):
        evaluate(model, smollm2_tokenizer, "boolq", [], "label")
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
        evaluate(model, smollm2_tokenizer, "boolq", records, "label", batch_size=0)
    with pytest.raises(ConfigError, match="apply to protocol generate only"):
        evaluate(model, smollm2_tokenizer, "boolq", records, "label", num_beams=2)


# ------------------------------------------------------------------ CLI
def _cli(args, capsys):
    try:
        rc = main(args)
    except SystemExit as exit_:
        rc = exit_.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_tokenizer):
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(seed=0, **WIDE).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--tasks", "ARC-Easy,nope", "--protocol", "label"],
            "unknown task 'nope'; valid tasks: boolq, piqa",
        ),
        (["--tasks", "boolq", "--protocol", "mc"], "unknown protocol 'mc'; allowed: generate, label, loglik"),
        (["--tasks", "boolq"], "--protocol is required"),
        (["--task", "boolq", "--data-file", "MISSING.json", "--protocol", "label"], "data file not found"),
        (["--task", "boolq", "--protocol", "label"], "--task needs --data-file"),
        (["--tasks", "boolq", "--task", "boolq", "--protocol", "label"], "give either --tasks"),
        (
            ["--tasks", "boolq", "--protocol", "label", "--limit", "0"],
            "--limit must be an integer >= 1 or null, got 0",
        ),
        (
            ["--tasks", "boolq", "--protocol", "label", "--limit", "abc"],
            "limit must be an integer or null, got 'abc'",
        ),
        (
            ["--tasks", "winogrande", "--split", "test", "--protocol", "label"],
            "winogrande has no bundled split 'test'",
        ),
        (
            ["--tasks", "boolq", "--protocol", "label", "--prompt", "mixlora"],
            "unknown prompt format 'mixlora'; allowed: alpaca, moe-peft",
        ),
        (
            ["--tasks", "boolq", "--protocol", "generate", "--prompt", "moe-peft"],
            "protocol generate reads the alpaca prompt only; with prompt moe-peft use protocol label",
        ),
        (
            ["--tasks", "boolq", "--protocol", "loglik", "--prompt", "moe-peft"],
            "protocol loglik reads the alpaca prompt only",
        ),
        (
            ["--tasks", "boolq", "--protocol", "label", "--adapter", "NOADAPTER"],
            "adapter directory not found",
        ),
        (["--tasks", "boolq", "--protocol", "label", "--num-beams", "4"], "apply to protocol generate only"),
        (["--tasks", "boolq", "--protocol", "generate", "--model", "NOMODEL"], "model 'NOMODEL' not found"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(
    tmp_path, capsys, monkeypatch, extra, message
):
    monkeypatch.chdir(tmp_path)
    out_file = tmp_path / "out" / "results.json"
    rc, _, err = _cli(["eval", "--model", "smollm2-135m-instruct", *extra, "--output", str(out_file)], capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("omoe eval: error: ")
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_cli_rejects_an_output_path_that_is_a_directory(tmp_path, capsys):
    rc, _, err = _cli(["eval", "--tasks", "boolq", "--protocol", "label", "--output", str(tmp_path)], capsys)
    assert rc == 2 and "is a directory" in err and err.count("\n") == 1


@pytest.mark.parametrize("protocol", ["generate", "label", "loglik"])
def test_cli_writes_results_predictions_and_prints_a_table(tiny_dir, tmp_path, capsys, protocol):
    out_file = tmp_path / "res.json"
    args = ["eval", "--model", str(tiny_dir), "--tasks", "boolq,winogrande", "--protocol", protocol]
    args += (
        ["--limit", "3", "--batch-size", "2", "--max-new-tokens", "4"]
        if protocol == "generate"
        else ["--limit", "3"]
    )
    rc, out, err = _cli([*args, "--output", str(out_file), "--no-progress"], capsys)
    assert rc == 0, err
    results = json.loads(out_file.read_text())
    assert results["protocol"] == protocol and results["limit"] == 3 and results["seed"] == 0
    assert results["adapter"] is None and results["model"] == str(tiny_dir)
    assert set(results["tasks"]) == {"boolq", "winogrande"}
    for metrics in results["tasks"].values():
        assert metrics["n"] == 3 and metrics["protocol"] == protocol and 0 <= metrics["accuracy"] <= 1
        assert ("acc_norm" in metrics) == (protocol == "loglik")
    lines = predictions_path(out_file).read_text().splitlines()
    boolq = [json.loads(line) for line in lines if json.loads(line)["task"] == "boolq"]
    matched = [p["prediction"] for p in boolq if not p["no_match"]]
    counts = results["tasks"]["boolq"]["prediction_counts"]
    assert counts == {a: matched.count(a) for a in set(matched)} and list(counts.values()) == sorted(
        counts.values(), reverse=True
    )
    assert sum(results["tasks"]["boolq"]["answer_counts"].values()) == 3
    assert [json.loads(line)["task"] for line in lines] == ["boolq"] * 3 + ["winogrande"] * 3
    assert f"| boolq | {protocol} | alpaca | 3 |" in out
    assert results["prompt"] == "alpaca" and all(m["prompt"] == "alpaca" for m in results["tasks"].values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.json", "res.predictions.jsonl"]


def test_cli_evaluates_a_saved_adapter_and_records_its_config(tiny_dir, tmp_path, capsys):
    omoe = pytest.importorskip("omoe")
    if not hasattr(omoe, "get_omoe_model"):
        pytest.skip("the adapter core is not available")
    from transformers import AutoModelForCausalLM

    wrapped = omoe.get_omoe_model(AutoModelForCausalLM.from_pretrained(tiny_dir), omoe.OMoEConfig())
    wrapped.save_pretrained(tmp_path / "adapter")
    out_file = tmp_path / "res.json"
    args = ["eval", "--model", str(tiny_dir), "--adapter", str(tmp_path / "adapter"), "--tasks", "boolq"]
    rc, _, err = _cli(
        [*args, "--protocol", "label", "--limit", "2", "--output", str(out_file), "--no-progress"], capsys
    )
    assert rc == 0, err
    results = json.loads(out_file.read_text())
    assert results["adapter"] == str((tmp_path / "adapter").resolve())
    expected = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert results["adapter_config"] == expected


def test_cli_rejects_an_adapter_that_does_not_fit_the_model(tiny_dir, tmp_path, capsys):
    """An adapter trained on another shape: one line naming the tensor, exit 2, nothing written."""
    import omoe

    other = omoe.get_omoe_model(tiny_llama(seed=0, hidden_size=32, intermediate_size=64), omoe.OMoEConfig())
    other.save_pretrained(tmp_path / "adapter")
    out_file = tmp_path / "out" / "res.json"
    args = ["eval", "--model", str(tiny_dir), "--adapter", str(tmp_path / "adapter"), "--tasks", "boolq"]
    rc, _, err = _cli([*args, "--protocol", "label", "--limit", "2", "--output", str(out_file)], capsys)
    last = err.strip().splitlines()[-1]  # above it: transformers' weight-loading progress bar
    assert rc == 2 and last.startswith("omoe eval: error: ") and err.count("omoe eval: error") == 1, err
    assert "tensor 'model.layers.0.mlp.omoe_experts.down.lora_A' has shape (2, 16, 64)" in last
    assert not out_file.parent.exists()


@pytest.mark.parametrize("task", ["social_i_qa", "winogrande"])
def test_cli_scores_a_users_full_test_file_in_both_prompt_formats(tiny_dir, tmp_path, capsys, task):
    data_file = tmp_path / "test.json"  # a user's own file: here the bundled sample, re-written
    data_file.write_text(json.dumps(load_task(task, "sample")[:5]))
    for prompt in ("alpaca", "moe-peft"):
        out_file = tmp_path / f"{prompt}.json"
        args = ["eval", "--model", str(tiny_dir), "--task", task, "--data-file", str(data_file), "--protocol"]
        rc, out, err = _cli(
            [*args, "label", "--prompt", prompt, "--output", str(out_file), "--no-progress"], capsys
        )
        assert rc == 0, err
        results = json.loads(out_file.read_text())
        assert results["prompt"] == prompt and results["tasks"][task]["prompt"] == prompt
        assert results["tasks"][task]["data_file"] == str(data_file) and results["tasks"][task]["n"] == 5
        assert f"| {task} | label | {prompt} | 5 |" in out
        preds = [json.loads(line) for line in predictions_path(out_file).read_text().splitlines()]
        names = get_task(task).labels if prompt == "alpaca" else tuple("ABC"[: len(get_task(task).labels)])
        assert all(tuple(p["scores"]) == names and p["prediction"] in get_task(task).labels for p in preds)


def test_cli_scores_the_val_split(tiny_dir, tmp_path, capsys):
    out_file = tmp_path / "val.json"
    args = [
        "eval",
        "--model",
        str(tiny_dir),
        "--tasks",
        "boolq,piqa",
        "--split",
        "val",
        "--protocol",
        "label",
    ]
    rc, _, err = _cli([*args, "--prompt", "moe-peft", "--limit", "2", "--output", str(out_file)], capsys)
    assert rc == 0, err
    tasks = json.loads(out_file.read_text())["tasks"]
    assert tasks["boolq"]["data_file"].endswith("boolq/train.json.gz [val]")
    assert tasks["piqa"]["data_file"].endswith("piqa/train.json.gz [val]")
