"""The core's command-line tools: ``omoe params`` and ``omoe bench``."""

import json

import pytest

from omoe.bench import BASELINE
from omoe.cli.main import main


def test_params_prints_the_paper_counts_for_llama2_7b(capsys):
    assert main(["params", "--shape", "llama2-7b"]) == 0
    out = capsys.readouterr().out
    assert "| OMoE-LoRA soft k=2 | 63,438,848 | 0.941 |" in out  # of 6,738,415,616 (the paper says 0.73%)
    # LoRA r80 plus one magnitude per output row: 32 x (4 x 4096 + 2 x 11008 + 4096) = 1,359,872
    assert "| DoRA r80 (the paper's Table 8) | 201,244,672 |" in out
    assert "| MixLoRA top-2 of 8 | 203,423,744 |" in out
    assert "| LoRA r80 (MixLoRA budget) | 199,884,800 |" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["params", "--set", "method=lorax"], "unknown method 'lorax'; allowed: lora, dora, moe, omoe"),
        (["params", "--set", "experts=3"], "expected KEY=VALUE with KEY one of"),
        (["params", "--shape", "gpt5"], "unknown shape 'gpt5'"),
        (["bench", "--variants", "base,qlora"], "unknown variant(s) qlora"),
        (["bench", "--steps", "0"], "--steps must be an integer >= 1"),
        (["bench", "--threads", "0"], "--threads must be an integer >= 1"),
        (["bench", "--device", "cpu", "--precision", "fp16"], "--precision fp16 needs CUDA"),
        (["bench", "--table3", "--precision", "bf16"], "--precision applies to the training benchmark"),
    ],
)
def test_bad_input_gives_one_line_error_exit_2_and_no_output(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_bench_runs_every_variant_on_one_base_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--preset", "tiny", "--steps", "1", "--warmup", "0", "--rounds", "2", "--device", "cpu",
            "--precision", "bf16", "--eval-prompts", "3", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["rounds"] == 2 and data["meta"]["autocast"] == "bf16"
    results = {r["variant"]: r for r in data["results"]}
    assert list(results) == ["base", "lora", "peft-lora", "omoe", BASELINE, "omoe-repr-before"]
    assert results["base"]["trainable"] == 0
    assert results["lora"]["trainable"] == results["peft-lora"]["trainable"] > 0
    assert results["omoe"]["trainable"] == results[BASELINE]["trainable"] > results["lora"]["trainable"]
    assert results["omoe-repr-before"]["trainable"] == results["omoe"]["trainable"]
    # the baseline is the step of before: all logits, fp32 (on CPU); the rest as asked, logits where used
    kinds = {v: (r["precision"], r["logits"]) for v, r in results.items()}
    assert kinds == {v: ("fp32", "all") if v == BASELINE else ("bf16", "used") for v in results}
    assert all(r["step_s"] >= r["step_s_min"] > 0 and r["saved_mib"] > 0 for r in results.values())
    assert all(r["tokens_per_s"] == pytest.approx(2 * 32 / r["step_s"]) for r in results.values())
    evals = {e["variant"]: e for e in data["eval"]}
    assert {v: (e["precision"], e["logits"]) for v, e in evals.items()} == {
        "label-before": ("fp32", "all"),
        "label-now": ("bf16", "last"),
    }
    seconds = {v: r["step_s"] for v, r in results.items()} | {v: e["seconds"] for v, e in evals.items()}
    ratios = {r["of"]: r for r in data["ratios"]}
    assert set(ratios) == {
        f"{BASELINE} / omoe", "omoe / peft-lora", "label-before / label-now", "omoe / omoe-repr-before"
    }
    for of, row in ratios.items():
        num, den = of.split(" / ")
        assert row["value"] == seconds[num] / seconds[den]
        op, bound = row["target"].split()
        assert row["met"] == (row["value"] >= float(bound) if op == ">=" else row["value"] <= float(bound))
    printed = capsys.readouterr().out
    assert f"| {BASELINE} | fp32 | all |" in printed and "| label-now | bf16 | last |" in printed


def test_bench_without_the_baseline_reports_its_ratio_as_missing(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "--preset", "tiny", "--layers", "1", "--steps", "1", "--warmup", "0", "--rounds", "1",
            "--device", "cpu", "--variants", "omoe", "--eval-prompts", "0", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert [r["variant"] for r in data["results"]] == ["omoe"] and data["eval"] == []
    assert all(r["value"] is None and r["met"] is None for r in data["ratios"])
