"""``omoe quickstart`` (the README's main job): on a tiny model for the plumbing, and end to end on the
bundled SmolLM2-135M-Instruct (``real_model``): the loss falls and the answer format is learned."""

from __future__ import annotations

import json

import pytest

from omoe.cli.main import main
from omoe.cli.quickstart import QuickstartConfig, quickstart
from omoe.errors import ConfigError
from omoe.models.testing import tiny_llama


def test_quickstart_writes_results_table_and_adapter(tmp_path, smollm2_tokenizer, capsys):
    config = QuickstartConfig(
        output_dir=str(tmp_path / "qs"), tasks=["boolq", "ARC-Easy"], eval_limit=3, train_per_task=4,
        max_steps=2, global_batch_size=4, micro_batch_size=2, cutoff_len=64, max_new_tokens=4,
        progress=False, layers="1", prompt="alpaca",
    )  # fmt: skip
    results = quickstart(config, model=tiny_llama(0), tokenizer=smollm2_tokenizer)
    out = tmp_path / "qs"
    assert json.loads((out / "results.json").read_text()) == results
    assert set(results["before"]) == set(results["after"]) == {"boolq", "ARC-Easy"}
    assert results["train"]["steps"] == 2 and results["train"]["examples"] == 8
    for stage in ("before", "after"):
        assert json.loads((out / f"{stage}.json").read_text())["protocol"] == "generate"
        assert len((out / f"{stage}.predictions.jsonl").read_text().splitlines()) == 6
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    printed = capsys.readouterr().out
    assert "| task | n | majority | accuracy before | accuracy after | gain [95% CI] |" in printed
    assert (out / "results.md").read_text().strip() in printed
    assert f"adapter: {out / 'adapter'}" in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "siqa"], "unknown task 'siqa'"),
        (["--prompt", "raw"], "unknown prompt format 'raw'; allowed: alpaca, moe-peft"),
        (["--prompt", "moe-peft", "--protocol", "loglik"], "protocol loglik reads the alpaca prompt only"),
        (["--max_steps", "0"], "max_steps must be an integer >= 1"),
        (["--lr", "-1"], "lr must be > 0"),
        (["--no-such-option", "1"], "no-such-option"),
    ],
)
def test_quickstart_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "qs"
    try:
        code = main(["quickstart", "--output_dir", str(out), *argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_quickstart_config_validates_before_anything_runs():
    with pytest.raises(ConfigError, match="tasks must name at least one task"):
        QuickstartConfig(tasks=[])


@pytest.mark.real_model
def test_real_model_fine_tune_lowers_the_loss_and_learns_the_answer_format(tmp_path):
    """SmolLM2-135M-Instruct almost never answers in the required format before fine-tuning; a short
    OMoE fine-tune on the bundled train sets must lower the loss and teach the format (no-match)."""
    config = QuickstartConfig(
        output_dir=str(tmp_path / "qs"), tasks=["ARC-Easy", "boolq"], eval_limit=16, train_per_task=48,
        max_steps=10, progress=False, prompt="alpaca", layers="all", lr=1e-3, warmup_steps=2,
    )  # fmt: skip
    results = quickstart(config)
    train = results["train"]
    print(json.dumps({k: results[k] for k in ("before", "after", "train", "seconds")}, indent=1))
    assert train["final_loss"] < 0.5 * train["first_loss"], train
    no_match = {s: sum(m["no_match"] for m in results[s].values()) for s in ("before", "after")}
    n = sum(m["n"] for m in results["before"].values())
    assert no_match["before"] >= n // 4, no_match  # the untuned model mostly misses the format ...
    assert no_match["after"] <= n // 8, no_match  # ... and the fine-tuned one mostly follows it


def test_gain_is_the_paired_accuracy_difference_with_a_bootstrap_interval():
    from omoe.cli.quickstart import gain

    def preds(correct, predicted):
        return [
            {"task": "boolq", "index": i, "answer": "true" if i % 4 else "false", "prediction": p, "correct": c}
            for i, (c, p) in enumerate(zip(correct, predicted))
        ]

    n = 400
    before = preds([i % 2 == 0 for i in range(n)], ["true"] * n)  # accuracy 0.5, one answer
    after = preds([i % 2 == 0 or i % 3 == 0 for i in range(n)], ["true", "false"] * (n // 2))
    g = gain(before, after, "boolq")
    assert g["n"] == n and g["gain"] == pytest.approx(sum(i % 2 == 1 and i % 3 == 0 for i in range(n)) / n)
    assert 0 < g["low"] < g["gain"] < g["high"]  # 67 of 400 records flip to right, none to wrong
    assert g["majority"] == 0.75 and g["top_answer_before"] == 1.0 and g["top_answer_after"] == 0.5
    with pytest.raises(ConfigError, match="scored different records"):
        gain(before, after[:-1], "boolq")
