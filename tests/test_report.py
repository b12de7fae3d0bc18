"""``omoe report``: each table from synthetic result JSONs, with hand-computed means and sample
standard deviations; Fig. 4 writes a PNG; bad input is a one-line error that writes nothing."""

from __future__ import annotations

import csv
import itertools
import json
import math
import statistics

import numpy as np
import pytest
import torch

from omoe.cli.main import main
from omoe.errors import ConfigError
from omoe.experiment import stats
from omoe.experiment.report import available_tables, build_tables, format_mean_std, load_results, mean_std
from omoe.experiment.runner import RESULT_KIND
from omoe.models.memory import cpu_peak_bytes
from omoe.train.config import TrainConfig


def cell(method, setting, task_acc, seed=0, method_index=0, sweep=None, sweep_index=0, params=1000,
         protocol="generate", adapter=None, experiment="exp"):  # fmt: skip
    """A result JSON as ``omoe experiment`` writes it (only the fields the report reads are real)."""
    config = TrainConfig().to_dict()
    config["adapter"].update(adapter or {})
    tasks = list(task_acc)
    name = "__".join([method, f"single-{tasks[0]}" if setting == "single" else "multi",
                      *[f"{k}-{v}" for k, v in (sweep or {}).items()], f"seed{seed}"])  # fmt: skip
    return {
        "kind": RESULT_KIND, "schema": 1, "experiment": experiment, "cell": name, "method": method,
        "method_index": method_index, "setting": setting, "tasks": ["boolq", "ARC-Easy"], "train_tasks": tasks,
        "eval_tasks": tasks,
        "seed": seed, "sweep": sweep or {}, "sweep_index": sweep_index, "train_config": config,
        "trainable_parameters": params, "eval": {"protocols": [protocol]},
        "metrics": {t: {protocol: {"accuracy": a, "n": 40, "correct": round(40 * a), "no_match": 0}}
                    for t, a in task_acc.items()},
    }  # fmt: skip


def write(tmp_path, cells, name="results"):
    out = tmp_path / name
    out.mkdir()
    for c in cells:
        (out / f"{c['cell']}.json").write_text(json.dumps(c))
    return out


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def row(markdown: str, label: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_mean_and_sample_std_and_the_one_seed_wording():
    assert mean_std([0.5, 0.6, 0.7]) == pytest.approx((0.6, 0.1))
    assert format_mean_std([0.5, 0.6, 0.7]) == "60.0 ± 10.0"
    assert format_mean_std([0.55]) == "55.0 ±0.0 (1 seed)"
    assert format_mean_std([0.5, 0.7], expected_seeds=3) == "60.0 ± 14.1 (2 seeds)"
    assert format_mean_std([]) == "–"


def test_table1_rows_are_methods_with_mean_std_over_seeds_avg_per_seed_and_params(tmp_path, capsys):
    boolq = {"lora": [0.50, 0.60, 0.70], "omoe": [0.70, 0.70, 0.75]}
    arc = {"lora": [0.30, 0.20, 0.40], "omoe": [0.50, 0.45, 0.40]}
    cells = [
        cell(m, "single", {task: acc[m][s]}, seed=s, method_index=i, params=p)
        for i, (m, p) in enumerate((("lora", 8192), ("omoe", 22528)))
        for task, acc in (("boolq", boolq), ("ARC-Easy", arc))
        for s in range(3)
    ]
    results = write(tmp_path, cells)
    assert main(["report", "--results", str(results), "--table", "1", "--output", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "table1.md").read_text()
    assert "protocol `generate`" in md and "over 3 seed(s)" in md and "boolq 40" in md
    assert "| method | #params | boolq | ARC-Easy | Avg |" in md  # the experiment's task order
    # lora's per-seed averages are 40, 40 and 55: mean 45, sample std 8.66
    assert row(md, "lora") == ["lora", "8,192", "60.0 ± 10.0", "30.0 ± 10.0", "45.0 ± 8.7"]
    avg = [statistics.fmean([boolq["omoe"][s], arc["omoe"][s]]) * 100 for s in range(3)]
    omoe = row(md, "omoe")
    assert omoe[:2] == ["omoe", "22,528"]
    assert omoe[4] == f"{statistics.fmean(avg):.1f} ± {statistics.stdev(avg):.1f}"
    assert md in capsys.readouterr().out
    rows = read_csv(tmp_path / "out" / "table1.csv")
    assert [r["row"] for r in rows] == ["lora", "omoe"]
    assert float(rows[0]["boolq_mean"]) == pytest.approx(60.0) and float(
        rows[0]["boolq_std"]
    ) == pytest.approx(10.0)
    assert rows[0]["boolq_seeds"] == "3" and rows[0]["trainable_parameters"] == "8192"


def test_table2_shows_single_multi_and_their_difference(tmp_path):
    cells = [
        cell("omoe", "single", {"boolq": 0.6}),
        cell("omoe", "single", {"ARC-Easy": 0.4}),
        cell("omoe", "multi", {"boolq": 0.7, "ARC-Easy": 0.3}),
    ]
    (table,) = build_tables(load_results(write(tmp_path, cells)), ["2"])
    md = table.markdown
    assert row(md, "omoe")[:5] == ["omoe", "single", "1,000", "60.0 ±0.0 (1 seed)", "40.0 ±0.0 (1 seed)"]
    multi = next(line for line in md.splitlines() if "| multi |" in line)
    assert multi.split("|")[4].strip() == "70.0 ±0.0 (1 seed)"
    delta = next(line for line in md.splitlines() if "Δ multi − single" in line)
    assert [c.strip() for c in delta.strip("|").split("|")][3:] == ["+10.0", "-10.0", "+0.0"]


def test_answers_table_gives_the_top_prediction_share_from_counts_or_the_predictions_file(tmp_path):
    counted = cell("lora", "multi", {"boolq": 0.75}, seed=0)
    counted["metrics"]["boolq"]["generate"].update(
        prediction_counts={"true": 40}, answer_counts={"true": 30, "false": 10}
    )
    second = cell("lora", "multi", {"boolq": 0.6}, seed=1)
    second["metrics"]["boolq"]["generate"].update(
        prediction_counts={"true": 30, "false": 8}, answer_counts={"true": 30, "false": 10}
    )
    # an older result without counts: read from the predictions file in its work dir
    work = tmp_path / "run-omoe"
    work.mkdir()
    preds = [{"task": "boolq", "protocol": "generate", "answer": "true" if i < 30 else "false",
              "prediction": "false" if i < 10 else "true", "no_match": False} for i in range(40)]  # fmt: skip
    (work / "eval_predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    older = {**cell("omoe", "multi", {"boolq": 0.5}, method_index=1), "work_dir": str(work)}
    silent = cell("dora", "multi", {"boolq": 0.5}, method_index=2)  # neither: left out
    results = load_results(write(tmp_path, [counted, second, older, silent]))
    assert "answers" in available_tables(results)
    (table,) = build_tables(results, ["answers"])
    md = table.markdown
    assert row(md, "lora") == ["lora", "multi", "87.5 `true`"]  # mean of 100% and 75%
    assert row(md, "omoe") == ["omoe", "multi", "75.0 `true`"]
    assert row(md, "gold majority") == ["gold majority", "", "75.0 `true`"]
    assert "| dora |" not in md
    assert available_tables(load_results(write(tmp_path, [silent], name="bare"))) == ["2", "runs"]


def test_answers_table_names_the_first_seeds_top_answer_when_the_seeds_tie(tmp_path):
    """Eight seeds, each with another top answer: the first seed's is named (a set's order, which
    varies with the string hash seed between processes, picked one before)."""
    cells = []
    for seed, top in enumerate(["x7", "x2", "x5", "x0", "x3", "x6", "x1", "x4"]):
        c = cell("lora", "multi", {"boolq": 0.5}, seed=seed)
        c["metrics"]["boolq"]["generate"].update(prediction_counts={top: 40}, answer_counts={"true": 40})
        cells.append(c)
    (table,) = build_tables(load_results(write(tmp_path, cells)), ["answers"])
    assert row(table.markdown, "lora") == ["lora", "multi", "100.0 `x7`"]


def test_runs_table_lists_each_cells_wall_times_over_resumptions_and_the_totals(tmp_path):
    first = cell("lora", "multi", {"boolq": 0.5}, seed=0)
    second = cell("omoe", "multi", {"boolq": 0.5}, seed=0, method_index=1)
    for c, (load, call_train, all_train, ev) in zip(
        (first, second), ((5.0, 10.0, 10.0, 20.0), (0.0, 4.0, 30.0, 40.0))
    ):
        c["wall_seconds"] = {"load": load, "train": call_train, "eval": ev, "total": load + call_train + ev}
        c["train"] = {"wall_seconds": all_train}  # the second cell was resumed: 30 s in all, 4 in this call
        c["hardware"] = {"device": "cpu", "device_name": "AMD EPYC", "cpu_threads": 2}
    (table,) = build_tables(load_results(write(tmp_path, [second, first])), ["runs"])
    md = table.markdown
    assert row(md, "lora__multi__seed0")[2:6] == ["5", "10", "20", "35"]
    assert row(md, "omoe__multi__seed0")[2:7] == ["0", "30", "40", "70", "AMD EPYC (cpu, 2 threads)"]
    assert md.index("lora__multi") < md.index("omoe__multi")
    assert "| **2 cells** | | 5 | 40 | 60 | 105 (0.03 h) | | |" in md


def test_table4_rows_are_the_orthogonal_layers_choices_per_setting(tmp_path):
    cells = [
        cell(
            "omoe",
            "multi",
            {"boolq": acc},
            sweep={"adapter.orthogonal_layers": layers},
            sweep_index=i,
            adapter={"orthogonal_layers": layers},
        )
        for i, (layers, acc) in enumerate((("all", 0.7), ("none", 0.6), ("low+high", 0.65)))
    ]
    results = load_results(write(tmp_path, cells))
    assert "4" in available_tables(results)
    (table,) = build_tables(results, ["4"])
    labels = [line.split("|")[1].strip() for line in table.markdown.splitlines() if line.startswith("| ")][1:]
    assert labels == ["all", "none", "low+high"]
    assert row(table.markdown, "none")[2] == "60.0 ±0.0 (1 seed)"
    assert "multi-task accuracy (%), protocol `generate`" in table.markdown


def test_table10_rows_are_method_and_rank_with_parameter_counts(tmp_path):
    cells = [
        cell(
            "omoe",
            "multi",
            {"boolq": 0.5 + r / 100},
            sweep={"adapter.r": r},
            sweep_index=i,
            params=1000 * r,
            adapter={"r": r, "alpha": 2 * r},
        )
        for i, r in enumerate((2, 8, 32))
    ]
    (table,) = build_tables(load_results(write(tmp_path, cells)), ["10"])
    assert row(table.markdown, "omoe r=8") == [
        "omoe r=8",
        "8,000",
        "58.0 ±0.0 (1 seed)",
        "58.0 ±0.0 (1 seed)",
    ]
    assert [r["row"] for r in table.csv_rows] == ["omoe r=2", "omoe r=8", "omoe r=32"]


def test_fig4_draws_accuracy_against_the_number_of_experts_one_line_per_routing(tmp_path):
    cells = []
    for i, (method, top_k) in enumerate((("omoe_soft", None), ("omoe_top2", 2))):
        for j, k in enumerate((2, 4, 8)):
            for seed in (0, 1):
                acc = 0.5 + 0.01 * k + 0.02 * seed + (0.05 if top_k else 0)
                cells.append(cell(method, "multi", {"boolq": acc, "ARC-Easy": acc - 0.1}, seed=seed, method_index=i,
                                  sweep={"adapter.num_experts": k}, sweep_index=j,
                                  adapter={"num_experts": k, "top_k": top_k,
                                           "routing": "topk" if top_k else "soft"}))  # fmt: skip
    results = write(tmp_path, cells)
    assert main(["report", "--results", str(results), "--output", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "fig4.csv",
        "fig4.md",
        "fig4.png",
        "runs.csv",
        "runs.md",
        "table2.csv",
        "table2.md",
    ]
    assert (out / "fig4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = read_csv(out / "fig4.csv")
    assert {p["line"] for p in points} == {"omoe_soft (soft)", "omoe_top2 (top-2)"}
    p = next(p for p in points if p["line"] == "omoe_top2 (top-2)" and p["adapter.num_experts"] == "4")
    per_seed = [100 * (0.5 + 0.04 + 0.02 * s + 0.05 - 0.05) for s in (0, 1)]  # mean of the two tasks
    assert float(p["mean"]) == pytest.approx(statistics.fmean(per_seed))
    assert float(p["std"]) == pytest.approx(statistics.stdev(per_seed)) and p["seeds"] == "2"


def test_table3_reads_the_bench_json(tmp_path):
    bench = {
        "kind": "omoe.bench.table3",
        "meta": {"device": "NVIDIA H100", "preset": "llama2-7b", "weights": "random weights", "batch": 8,
                 "new_tokens": 32, "prompt_tokens": 64, "rounds": 3, "dtype": "bfloat16", "torch": "2.x",
                 "peak_measured": True},
        "results": [
            {"method": "base", "trainable": 0, "adapter_mib": 0.0, "latency_s": 1.0, "latency_ratio": 1.0,
             "extra_peak_mib": 0.0, "peak_ratio": 1.0, "train_saved_mib": 100.0},
            {"method": "omoe-soft", "trainable": 63438848, "adapter_mib": 242.0, "latency_s": 1.5,
             "latency_ratio": 1.5, "extra_peak_mib": 300.0, "peak_ratio": 1.02, "train_saved_mib": 150.0},
        ],
    }  # fmt: skip
    path = tmp_path / "table3.json"
    path.write_text(json.dumps(bench))
    assert main(["report", "--results", str(path), "--table", "3"]) == 0
    md = (tmp_path / "table3.md").read_text()
    assert row(md, "omoe-soft") == [
        "omoe-soft",
        "63,438,848",
        "242.0",
        "1.500",
        "1.50",
        "300.0",
        "1.020",
        "150.0",
    ]
    assert "NVIDIA H100" in md and "8 prompts x 32 new tokens" in md


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--table", "4"], "table 4 cannot be built"),
        (["--table", "7"], "unknown table '7'"),
        (["--table", "fig4", "--x", "adapter.nope"], "unknown --x key adapter.nope"),
    ],
)
def test_report_errors_are_one_line_and_write_nothing(tmp_path, capsys, argv, message):
    results = write(tmp_path, [cell("lora", "single", {"boolq": 0.5})])
    before = sorted(p.name for p in results.iterdir())
    assert main(["report", "--results", str(results), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in results.iterdir()) == before


def test_a_directory_without_results_or_with_broken_json_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.json").write_text('{"kind": "something else"}')
    assert main(["report", "--results", str(empty)]) == 2
    assert "no experiment results in" in capsys.readouterr().err
    (empty / "broken.json").write_text("{")
    assert main(["report", "--results", str(empty)]) == 2
    assert "broken.json is not a readable JSON file" in capsys.readouterr().err
    assert main(["report", "--results", str(tmp_path / "missing")]) == 2
    assert sorted(p.name for p in empty.iterdir()) == ["broken.json", "notes.json"]


def test_bench_table3_measures_every_method_against_the_base_and_report_reads_it(tmp_path, capsys):
    out = tmp_path / "table3.json"
    argv = ["bench", "--table3", "--preset", "tiny", "--layers", "1", "--batch", "2", "--prompt-tokens", "8",
            "--new-tokens", "3", "--rounds", "1", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["kind"] == "omoe.bench.table3" and data["meta"]["new_tokens"] == 3
    rows = {r["method"]: r for r in data["results"]}
    assert list(rows) == ["base", "lora", "dora", "moe-top2of8", "omoe-soft", "omoe-top2of8"]
    assert rows["base"]["latency_ratio"] == 1.0 and rows["base"]["trainable"] == 0
    assert (
        rows["moe-top2of8"]["trainable"] == rows["omoe-top2of8"]["trainable"] > rows["omoe-soft"]["trainable"]
    )
    for r in rows.values():
        assert r["adapter_mib"] == pytest.approx(r["trainable"] * 4 / 2**20)  # fp32 adapter weights
        # CPU peak: weights + the most tensor bytes alive at once; an adapter adds at least its weights
        assert r["extra_peak_mib"] == pytest.approx(r["peak_mib"] - rows["base"]["peak_mib"])
        assert r["extra_peak_mib"] >= 0.99 * r["adapter_mib"]
        assert r["train_saved_mib"] > 0
    assert data["meta"]["peak_method"] == "profiler"
    printed = capsys.readouterr().out
    assert "(CPU: torch profiler, per-op allocations)" in printed
    assert main(["report", "--results", str(out)]) == 0
    assert (tmp_path / "table3.md").read_text().strip() in printed
    assert main(["bench", "--table3", "--variants", "base,peft-lora"]) == 2
    assert "unknown variant(s) peft-lora" in capsys.readouterr().err


def test_cpu_peak_bytes_is_the_most_tensor_memory_alive_at_once():
    x = torch.randn(256, 256)  # allocated before: not counted

    def fn():
        a = x @ x  # 256 KiB
        b = torch.cat([a, a])  # 512 KiB; 768 alive
        del a
        d = torch.ones(1024, 1024)  # 4 MiB; with b: 4608 KiB alive, the peak
        del d
        return b.sum()

    assert cpu_peak_bytes(fn) == pytest.approx(4608 * 1024, abs=64)


def test_bench_table3_measures_a_real_models_weights_with_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "table3.json"
    argv = ["bench", "--table3", "--model", str(tiny_model_dir), "--variants", "base,omoe-soft", "--batch", "2",
            "--prompt-tokens", "8", "--new-tokens", "3", "--rounds", "1", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["weights"] == "pretrained weights" and data["meta"]["preset"] == str(tiny_model_dir)
    assert [r["method"] for r in data["results"]] == ["base", "omoe-soft"]
    assert data["results"][1]["trainable"] > 0 and data["results"][1]["extra_peak_mib"] > 0
    capsys.readouterr()
    assert main(["bench", "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--model applies to --table3 only" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------- paired statistics
LOG3 = math.log(3)


def label_predictions(task, correct, labels=("true", "false")):
    """``label``-protocol predictions: gold logit log 3 and 0 elsewhere when correct, the reverse when
    not, so log p(gold) is log(3/4) or log(1/4) (two labels)."""
    out = []
    for i, ok in enumerate(correct):
        gold, other = labels[i % 2], labels[(i + 1) % 2]
        scores = {gold: LOG3, other: 0.0} if ok else {gold: 0.0, other: LOG3}
        out.append({"task": task, "protocol": "label", "index": i, "answer": gold, "correct": bool(ok),
                    "prediction": gold if ok else other, "no_match": False, "scores": scores})  # fmt: skip
    return out


def with_records(c, folder, correct_by_task, test_records=None):
    """Write ``c``'s records file into ``folder`` as the runner does, from per-task correctness."""
    preds = [p for task, correct in correct_by_task.items() for p in label_predictions(task, correct)]
    test_records = {t: [{"id": i} for i in range(len(v))] for t, v in correct_by_task.items()} | (
        test_records or {}
    )
    folder.mkdir(exist_ok=True)
    path = stats.records_path(folder / f"{c['cell']}.json")
    stats.write_records(path, stats.records_payload(c["cell"], test_records, preds))
    return {**c, "records_file": path.name}


def paired_results(tmp_path, lora_seeds=(0, 1)):
    """omoe (seeds 0-2) against lora (``lora_seeds``) and dora (no per-record results) on boolq (4
    records: omoe better) and ARC-Easy (3 records: the same answers)."""
    folder = tmp_path / "results"
    omoe = {0: [1, 1, 1, 1], 1: [1, 1, 1, 0], 2: [1, 1, 1, 1]}
    cells = []
    for s in (0, 1, 2):
        c = cell("omoe", "multi", {"boolq": 0.5, "ARC-Easy": 0.5}, seed=s, method_index=2, protocol="label",
                 adapter={"method": "omoe"})  # fmt: skip
        cells.append(with_records(c, folder, {"boolq": omoe[s], "ARC-Easy": [1, 0, 1]}))
    for s in lora_seeds:
        c = cell(
            "lora",
            "multi",
            {"boolq": 0.5, "ARC-Easy": 0.5},
            seed=s,
            protocol="label",
            adapter={"method": "lora"},
        )
        cells.append(with_records(c, folder, {"boolq": [0, 0, 0, 0], "ARC-Easy": [1, 0, 1]}))
    cells.append(cell("dora", "multi", {"boolq": 0.5, "ARC-Easy": 0.5}, method_index=1, protocol="label",
                      adapter={"method": "dora"}))  # fmt: skip
    for c in cells:
        (folder / f"{c['cell']}.json").write_text(json.dumps(c))
    return folder


def test_gold_logprob_is_the_log_softmax_over_the_labels_at_the_gold_label():
    assert stats.gold_logprob({"true": LOG3, "false": 0.0}, "true") == pytest.approx(
        math.log(0.75), abs=1e-15
    )
    assert stats.gold_logprob({"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0}, "c") == pytest.approx(-math.log(4))
    # logits far from 0 lose no precision: computed from the differences to the largest
    assert stats.gold_logprob({"x": 1e4 + LOG3, "y": 1e4}, "y") == pytest.approx(math.log(0.25), rel=1e-12)
    with pytest.raises(ConfigError, match="NaN"):
        stats.gold_logprob({"x": float("nan"), "y": 0.0}, "y")
    with pytest.raises(ConfigError, match="not one of the scored labels"):
        stats.gold_logprob({"x": 0.0, "y": 0.0}, "z")


def test_bootstrap_of_constant_differences_is_a_zero_width_interval():
    (est,) = stats.paired_estimates([np.full(50, 0.25)])
    assert (est.mean, est.low, est.high) == (0.25, 0.25, 0.25)


def test_bootstrap_resamples_follow_the_exact_enumeration_of_a_small_sample():
    values = np.array([0.0, 1.0, 1.0, 3.0])
    exact = [statistics.fmean(draw) for draw in itertools.product(values, repeat=4)]  # 256, equally likely
    drawn = stats.bootstrap_means(values, 10_000, seed=0)
    for x in sorted(set(exact)):
        assert np.mean(drawn <= x) == pytest.approx(np.mean(np.array(exact) <= x), abs=0.02), x
    assert np.array_equal(drawn, stats.bootstrap_means(values, 10_000, seed=0))  # seeded: reproducible


def test_bootstrap_interval_of_a_large_sample_is_the_normal_one():
    x = np.random.default_rng(5).normal(1.0, 2.0, size=2000)
    (est,) = stats.paired_estimates([x])
    half = 1.959964 * x.std() / math.sqrt(len(x))  # the bootstrap's standard error uses the n-divisor std
    assert est.mean == pytest.approx(x.mean())
    assert est.low == pytest.approx(x.mean() - half, abs=0.05 * half)
    assert est.high == pytest.approx(x.mean() + half, abs=0.05 * half)


def test_paired_interval_excludes_zero_for_a_better_method_and_includes_it_for_an_equal_one():
    rng = np.random.default_rng(7)
    better, worse = rng.random(400) < 0.8, rng.random(400) < 0.5
    assert stats.paired_estimates([better.astype(float) - worse])[0].excludes_zero()
    same_a, same_b = rng.random(400) < 0.6, rng.random(400) < 0.6  # equally good, independent errors
    assert not stats.paired_estimates([same_a.astype(float) - same_b])[0].excludes_zero()
    assert stats.paired_estimates([np.zeros(400)])[0] == stats.Estimate(0.0, 0.0, 0.0)


def test_records_file_is_deterministic_and_keeps_correctness_and_gold_logprob(tmp_path):
    preds = label_predictions("boolq", [1, 0, 1])
    payload = stats.records_payload("c", {"boolq": [{"q": i} for i in range(3)]}, preds)
    a, b = tmp_path / "a.records.json.gz", tmp_path / "b.records.json.gz"
    stats.write_records(a, payload)
    stats.write_records(b, payload)
    assert a.read_bytes() == b.read_bytes()  # no timestamp in the gzip header: committed files stay stable
    (r,) = stats.read_records(a).values()
    assert r.index == (0, 1, 2) and r.answer == ("true", "false", "true")
    assert r.correct.tolist() == [1.0, 0.0, 1.0]
    assert r.gold_logprob == pytest.approx([math.log(0.75), math.log(0.25), math.log(0.75)], abs=1e-6)
    assert r.same_records(stats.records_from_predictions(preds)[("boolq", "label")])
    other = stats.records_payload("c", {"boolq": [{"q": i + 1} for i in range(3)]}, preds)
    assert not r.same_records(stats.parse_records(other)[("boolq", "label")])  # other records, same indices
    (tmp_path / "bad.records.json.gz").write_bytes(b"not gzip")
    with pytest.raises(ConfigError, match="not a readable records file"):
        stats.read_records(tmp_path / "bad.records.json.gz")


def test_paired_table_pools_the_common_seeds_per_record_with_hand_computed_intervals(tmp_path, capsys):
    folder = paired_results(tmp_path)
    assert main(["report", "--results", str(folder), "--output", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert {"paired.md", "paired.csv", "logprob.md", "logprob.csv"} <= {p.name for p in out.iterdir()}
    md = (out / "paired.md").read_text()
    assert "omoe minus each method, same test records" in md and "boolq 4, ARC-Easy 3" in md
    lines = [line for line in md.splitlines() if line.startswith("| lora |")]
    acc, lp = ([c.strip() for c in line.strip("|").split("|")] for line in lines)
    # seeds 0, 1 only; per boolq record omoe - lora = (1 + 1)/2 three times, (1 + 0)/2 once: mean 0.875.
    # A resample of the 4 records averages 1 - k/8 (k ~ Bin(4, 1/4) draws of the 0.5 record):
    # P(k >= 3) = 5.1% > 2.5% > P(k = 4) = 0.4%, so low = 1 - 3/8; P(k = 0) = 32% > 2.5%, so high = 1.
    assert acc[:4] == [
        "lora",
        "0, 1 (common; omoe has 3, lora 2)",
        "Δ accuracy (points)",
        "+87.5 [+62.5, +100.0]",
    ]
    assert acc[4] == "+0.0 [+0.0, +0.0]"  # ARC-Easy: the same answers
    assert acc[5] == "+43.8 [+31.2, +50.0]"  # Avg: ARC-Easy's differences are constant 0: half of boolq's
    # log p(gold): log 3/4 - log 1/4 = log 3 per record and seed where omoe is right, 0 where both are wrong
    assert lp[2:4] == [
        "Δ log p(gold) (nats)",
        f"{0.875 * LOG3:+.3f} [{(1 - 3 / 8) * LOG3:+.3f}, {LOG3:+.3f}]",
    ]
    assert row(md, "dora")[3:] == ["n/a", "n/a", "n/a"]
    rows = read_csv(out / "paired.csv")
    boolq = next(
        r for r in rows if r["row"] == "lora" and r["task"] == "boolq" and r["quantity"] == "accuracy_points"
    )
    assert (boolq["seeds"], boolq["records"], float(boolq["diff"])) == ("0 1", "4", 87.5)

    lp_md = (out / "logprob.md").read_text()
    per_seed = [math.log(0.75), (3 * math.log(0.75) + math.log(0.25)) / 4, math.log(0.75)]
    mean, std = statistics.fmean(per_seed), statistics.stdev(per_seed)
    assert row(lp_md, "omoe")[2] == f"{mean:.3f} ± {std:.3f}"
    assert row(lp_md, "lora")[2] == f"{math.log(0.25):.3f} ± 0.000 (2 seeds)"
    assert row(lp_md, "dora")[2:] == ["n/a", "n/a", "n/a"]
    assert row(lp_md, "uniform")[2:] == [
        f"{-math.log(2):.3f}",
        f"{-math.log(5):.3f}",
        f"{-(math.log(2) + math.log(5)) / 2:.3f}",
    ]
    printed = capsys.readouterr().out
    assert md.strip() in printed
    assert main(["report", "--results", str(folder), "--output", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "paired.md").read_text() == md  # seeded: the same output every run


def test_paired_table_takes_a_reference_by_method_name_and_reads_old_predictions_files(tmp_path):
    folder = paired_results(tmp_path)
    for path in folder.glob(
        "lora__*.json"
    ):  # an older lora result: no records file, predictions in its work dir
        c = json.loads(path.read_text())
        (folder / c.pop("records_file")).unlink()
        work = tmp_path / f"run-{c['cell']}"
        work.mkdir()
        preds = label_predictions("boolq", [0, 0, 0, 0]) + label_predictions("ARC-Easy", [1, 0, 1])
        (work / "eval_predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
        path.write_text(json.dumps({**c, "work_dir": str(work)}))
    (table,) = build_tables(load_results(folder), ["paired"], reference="lora")
    assert "lora minus each method" in table.markdown
    assert row(table.markdown, "omoe")[3] == "-87.5 [-100.0, -62.5]"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"boolq": [0, 0, 0]}, "do not cover the same boolq test records (4 vs 3 records)"),
        (
            {"test_records": {"boolq": [{"id": 9 - i} for i in range(4)]}},
            "as many records, but not the same ones",
        ),
    ],
)
def test_paired_refuses_cells_that_scored_other_test_records(tmp_path, capsys, change, message):
    folder = paired_results(tmp_path)
    c = json.loads((folder / "lora__multi__seed1.json").read_text())
    test_records = change.pop("test_records", None)
    with_records(c, folder, {"boolq": [0, 0, 0, 0], "ARC-Easy": [1, 0, 1], **change}, test_records)
    assert (
        main(["report", "--results", str(folder), "--table", "paired", "--output", str(tmp_path / "out")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_paired_reference_errors_and_results_without_records(tmp_path, capsys):
    folder = paired_results(tmp_path)
    assert main(["report", "--results", str(folder), "--table", "paired", "--reference", "nope"]) == 2
    assert (
        "--reference nope is not a method or row of these results; rows: lora; dora; omoe"
        in capsys.readouterr().err
    )
    bare = write(tmp_path, [cell("omoe", "multi", {"boolq": 0.5}, adapter={"method": "omoe"}),
                            cell("lora", "multi", {"boolq": 0.5}, method_index=1)], name="bare")  # fmt: skip
    assert "paired" not in available_tables(load_results(bare))
    assert main(["report", "--results", str(bare), "--table", "paired"]) == 2
    assert "table paired cannot be built" in capsys.readouterr().err


# ---------------------------------------------------------------------------- prompt formats
def test_a_report_holds_one_prompt_format_and_names_it(tmp_path, capsys):
    def moe_peft(c):
        c = {
            **c,
            "cell": c["cell"].replace("__seed", "__moe-peft__seed"),
            "eval": {**c["eval"], "prompt": "moe-peft"},
        }
        return c

    alpaca = [cell(m, "single", {"boolq": a}, method_index=i, protocol="label")
              for i, (m, a) in enumerate((("lora", 0.50), ("omoe", 0.60)))]  # fmt: skip
    mixed = [*alpaca, *(moe_peft(cell(m, "single", {"boolq": a}, method_index=i, protocol="label"))
                        for i, (m, a) in enumerate((("lora", 0.70), ("omoe", 0.80))))]  # fmt: skip
    results = write(tmp_path, mixed)
    before = sorted(p.name for p in results.iterdir())
    assert main(["report", "--results", str(results), "--table", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "mixes prompt formats: alpaca (2 cells), moe-peft (2 cells)" in err and "--prompt" in err, err
    assert sorted(p.name for p in results.iterdir()) == before

    out = tmp_path / "out"
    for prompt in ("moe-peft", "alpaca"):
        argv = ["report", "--results", str(results), "--table", "1", "--prompt", prompt, "--output", str(out)]
        assert main(argv) == 0
        capsys.readouterr()
    moe_md, alpaca_md = (out / "table1-moe-peft.md").read_text(), (out / "table1.md").read_text()
    assert moe_md.startswith("Prompt format `moe-peft` (every cell).")
    assert row(moe_md, "lora")[2].startswith("70.0") and row(moe_md, "omoe")[2].startswith("80.0")
    assert row(alpaca_md, "lora")[2].startswith("50.0") and "Prompt format" not in alpaca_md
    assert {r["prompt"] for r in read_csv(out / "table1-moe-peft.csv")} == {"moe-peft"}
    assert load_results(results, "alpaca").prompt == "alpaca"
    with pytest.raises(ConfigError, match="no cells of prompt format raw in"):
        load_results(results, "raw")
