"""The core's command-line tools: ``omoe params`` and ``omoe bench``."""

import json

import pytest

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
        (["bench", "--steps", "0"], "--steps must be >= 1"),
        (["bench", "--threads", "0"], "--threads must be >= 1"),
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
    argv = [
        "bench",
        "--preset",
        "tiny",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--rounds",
        "2",
        "--device",
        "cpu",
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["rounds"] == 2
    results = {r["variant"]: r for r in data["results"]}
    assert list(results) == ["base", "lora", "peft-lora", "omoe"]
    assert results["base"]["trainable"] == 0
    assert results["lora"]["trainable"] == results["peft-lora"]["trainable"] > 0
    assert results["omoe"]["trainable"] > results["lora"]["trainable"]
    assert all(r["step_s"] > 0 and r["saved_mib"] > 0 for r in results.values())
    assert "| omoe |" in capsys.readouterr().out
