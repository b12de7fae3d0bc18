"""``omoe experiment``: shipped grids parse, a 2-cell grid on the tiny LLaMA writes result JSONs, a
re-run skips them, a cell killed mid-training resumes to the uninterrupted weights, a cell killed
during evaluation is evaluated without training again, and bad input is a one-line error."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from omoe.cli.main import main
from omoe.errors import ConfigError
from omoe.experiment import cell_state, load_experiment, run_experiment
from omoe.experiment.spec import build_experiment
from omoe.models.testing import tiny_llama
from omoe.train import checkpoint as ckpt
from omoe.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "experiments").rglob("*.yaml"))
NINE = ["lora_r16", "lora_r80", "dora_r16", "dora_r80", "moe_soft_k2", "mixlora_top2of8", "omoe_lora",
        "omoe_dora", "omoe_top2of8"]  # fmt: skip

# Two methods x one multi-task setting x one seed; boolq prompts cut to 32 tokens so steps are cheap.
GRID = {
    "name": "tiny",
    "base": {
        "model": "tiny-in-memory",
        "device": "cpu",
        "checkpoint_every": 1,
        "data": {"limit": 4, "cutoff_len": 32, "train_on_inputs": True},
        "optim": {
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "max_steps": 2,
            "warmup_steps": 0,
            "lr": 1e-2,
        },
        "logging": {"progress": False, "tensorboard": False},
    },
    "tasks": ["boolq", "ARC-Easy"],
    "settings": ["multi"],
    "methods": {
        "lora": {"adapter.method": "lora", "adapter.r": 4},
        "omoe_top2": {"adapter": {"num_experts": 4, "top_k": 2}},
    },
    "seeds": [0],
    "eval": {"protocols": ["label", "generate"], "limit": 2, "batch_size": 2, "max_new_tokens": 3},
}


def spec_of(tmp_path, data=None, name="grid"):
    return build_experiment(
        copy.deepcopy(data or GRID), None, tmp_path / name / "results", tmp_path / name / "runs"
    )


def run(spec, tokenizer, **kwargs):
    lines: list[str] = []
    written = run_experiment(
        spec, model=tiny_llama(0), tokenizer=tokenizer, progress=False, echo=lines.append, **kwargs
    )
    return written, lines


def scores(result: dict) -> dict:
    """Accuracies and counts per task and protocol (not the timings)."""
    return {t: {p: {k: v for k, v in m.items() if k != "seconds"} for p, m in by.items()}
            for t, by in result["metrics"].items()}  # fmt: skip


# ---------------------------------------------------------------------------- shipped configs
@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_shipped_experiment_parses_and_dry_runs_without_writing(path, tmp_path, capsys):
    spec = load_experiment(path, tmp_path / "results", tmp_path / "runs")
    assert spec.cells and spec.name == yaml.safe_load(path.read_text())["name"]
    code = main(["experiment", "--config", str(path), "--dry-run", "--results-dir", str(tmp_path / "results"),
                 "--work-dir", str(tmp_path / "runs")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert sum(line.startswith(f"| {c.id} |") for c in spec.cells for line in out.splitlines()) == len(
        spec.cells
    )
    assert f"{len(spec.cells)} todo" in out
    assert list(tmp_path.iterdir()) == []


def _experiment_pairs(*stems):
    """(LLaMA, SmolLM2) versions of each experiment file."""
    return [ROOT / "experiments" / sub / f"{stem}.yaml" for stem in stems for sub in ("", "smollm2")]


@pytest.mark.parametrize("path", _experiment_pairs("table1_single_task", "table2_multi_task"),
                         ids=lambda p: str(p.relative_to(ROOT)))  # fmt: skip
def test_table_configs_hold_the_papers_baselines_as_moe_peft_ran_them(path):
    spec = load_experiment(path)
    assert list(spec.methods) == NINE
    adapter = {c.method: c.config.adapter for c in spec.cells}
    for name, method in (("lora_r80", "lora"), ("dora_r80", "dora")):  # the paper's Table 8: r 80, alpha 160
        assert (adapter[name].method, adapter[name].r, adapter[name].alpha) == (method, 80, 160)
    mixlora = adapter["mixlora_top2of8"]  # MoE-PEFT's MixLoRA: top-2 of 8, load-balancing loss 0.001
    assert (mixlora.method, mixlora.num_experts, mixlora.routing, mixlora.router_aux_loss_coef) == (
        "moe", 8, "topk", 0.001)  # fmt: skip
    assert all(a.router_aux_loss_coef == 0 for name, a in adapter.items() if name != "mixlora_top2of8")
    assert adapter["omoe_dora"].use_dora and adapter["omoe_dora"].method == "omoe"
    assert adapter["omoe_lora"].routing == "soft" and adapter["omoe_lora"].num_experts == 2
    settings = {c.setting for c in spec.cells}
    assert settings == ({"single", "multi"} if path.stem == "table2_multi_task" else {"single"})


@pytest.mark.parametrize("path", _experiment_pairs("table4_5_layerwise", "table10_rank", "fig4_k_routing"),
                         ids=lambda p: str(p.relative_to(ROOT)))  # fmt: skip
def test_sweep_configs_run_the_papers_settings(path):
    spec = load_experiment(path)
    if path.stem == "fig4_k_routing":  # Fig. 4: k = 2..7
        assert sorted({c.config.adapter.num_experts for c in spec.cells}) == [2, 3, 4, 5, 6, 7]
        return
    assert {c.setting for c in spec.cells} == {"single"}  # Tables 4 and 10 are single-task runs
    if path.stem == "table10_rank":
        assert {(c.config.adapter.r, c.config.adapter.alpha) for c in spec.cells} == {
            (2, 4), (4, 8), (8, 16), (16, 32), (32, 64)}  # fmt: skip
    else:
        assert {c.config.adapter.orthogonal_layers for c in spec.cells} >= {"none", "all", "low+high"}


def test_cells_are_the_product_of_settings_tasks_sweep_methods_and_seeds(tmp_path):
    data = {**copy.deepcopy(GRID), "settings": ["single", "multi"], "seeds": [0, 1],
            "sweep": {"adapter.r,adapter.alpha": [[2, 4], [8, 16]]}}  # fmt: skip
    spec = spec_of(tmp_path, data)
    assert len(spec.cells) == 2 * (2 + 1) * 2 * 2  # seeds x (2 single + 1 multi) x sweep x methods
    cell = next(c for c in spec.cells if c.id == "omoe_top2__single-ARC-Easy__r-8+alpha-16__seed1")
    assert cell.train_tasks == cell.eval_tasks == ["ARC-Easy"] == cell.config.data.tasks
    assert (cell.config.adapter.r, cell.config.adapter.alpha, cell.config.seed) == (8, 16.0, 1)
    assert cell.config.output_dir == str(tmp_path / "grid" / "runs" / cell.id)
    assert [c.id for c in spec.select(["*__multi__*seed0"])] == [
        "lora__multi__r-2+alpha-4__seed0", "omoe_top2__multi__r-2+alpha-4__seed0",
        "lora__multi__r-8+alpha-16__seed0", "omoe_top2__multi__r-8+alpha-16__seed0",
    ]  # fmt: skip
    assert len(spec.select(["single-boolq"])) == 8


# ---------------------------------------------------------------------------- running
def test_grid_writes_one_result_per_cell_and_a_rerun_skips_them(tmp_path, smollm2_tokenizer):
    spec = spec_of(tmp_path)
    base = tiny_llama(0)
    lines: list[str] = []
    written = run_experiment(spec, model=base, tokenizer=smollm2_tokenizer, progress=False, echo=lines.append)
    assert [r["cell"] for r in written] == ["lora__multi__seed0", "omoe_top2__multi__seed0"]
    assert not any("omoe_" in n for n, _ in base.named_modules())  # the shared base got its modules back
    for cell, line in zip(spec.cells, lines):
        result = json.loads(spec.result_path(cell).read_text())
        assert result["kind"] == "omoe.experiment.cell" and result["experiment"] == "tiny"
        assert (result["cell"], result["method"], result["setting"], result["seed"]) == (
            cell.id,
            cell.method,
            "multi",
            0,
        )
        assert result["train_config"] == cell.config.to_dict()
        assert result["train"]["steps"] == 2 and result["train"]["final_loss"] > 0
        assert set(result["metrics"]) == {"boolq", "ARC-Easy"}
        for task in ("boolq", "ARC-Easy"):
            assert set(result["metrics"][task]) == {"label", "generate"}
            assert result["metrics"][task]["label"]["n"] == 2
        assert result["hardware"]["device"] == "cpu" and result["hardware"]["torch"] == torch.__version__
        assert set(result["wall_seconds"]) == {"load", "train", "eval", "total"}
        assert (cell.work_dir / "adapter_model.safetensors").is_file()
        assert (cell.work_dir / "eval_predictions.jsonl").is_file()
        assert line.startswith(f"[{spec.cells.index(cell) + 1}/2] {cell.id}: trained 2 steps")
    lora, omoe = written
    assert lora["trainable_parameters"] < omoe["trainable_parameters"]

    stamps = [spec.result_path(c).stat().st_mtime_ns for c in spec.cells]
    again, lines = run(spec, smollm2_tokenizer)
    assert again == [] and all("done, skipped" in line for line in lines)
    assert [spec.result_path(c).stat().st_mtime_ns for c in spec.cells] == stamps


def one_omoe_cell(**base) -> dict:
    """The grid cut to one OMoE cell of 4 steps, with ``base`` keys (checkpointing) set."""
    data = copy.deepcopy(GRID)
    data["methods"] = {"omoe": {}}
    data["base"]["optim"]["max_steps"] = 4
    data["base"].update(base)
    return data


def test_cell_killed_mid_training_resumes_to_the_weights_of_an_uninterrupted_run(
    tmp_path, smollm2_tokenizer, monkeypatch
):
    data = one_omoe_cell(checkpoint_every=2)
    whole = spec_of(tmp_path, data, "whole")
    run(whole, smollm2_tokenizer)

    killed = spec_of(tmp_path, data, "killed")
    save = ckpt.save_checkpoint

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt  # as if the process were stopped right after checkpoint step 2

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(killed, smollm2_tokenizer)
    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    (cell,) = killed.cells
    assert not killed.result_path(cell).exists()
    state = cell_state(killed, cell)
    assert state.state == "checkpoint" and "step-00000002" in state.detail

    (result,), lines = run(killed, smollm2_tokenizer)
    assert result["train"]["resumed_from"].endswith("step-00000002")
    assert "resumed from step-00000002" in lines[0]
    a = load_file(whole.cells[0].work_dir / "adapter_model.safetensors")
    b = load_file(cell.work_dir / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert scores(result) == scores(json.loads(whole.result_path(whole.cells[0]).read_text()))


def test_a_damaged_newest_checkpoint_leaves_the_cell_resumable_from_the_one_before(
    tmp_path, smollm2_tokenizer, monkeypatch
):
    data = one_omoe_cell(checkpoint_every=1, keep_checkpoints=3)
    spec = spec_of(tmp_path, data)
    save, calls = ckpt.save_checkpoint, []

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stopped right after checkpoint step 3

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(spec, smollm2_tokenizer)
    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    (cell,) = spec.cells
    newest = ckpt.latest_checkpoint(cell.work_dir)
    (newest / ckpt.STATE_JSON).write_text("{ truncated")
    state = cell_state(spec, cell)
    assert state.state == "checkpoint" and "step-00000002" in state.detail, state
    assert [p.name for p in ckpt.list_checkpoints(cell.work_dir)][-1] == newest.name  # nothing deleted
    (result,), _ = run(spec, smollm2_tokenizer)
    assert result["train"]["resumed_from"].endswith("step-00000002")


def test_cell_killed_during_evaluation_is_evaluated_without_training_again(
    tmp_path, smollm2_tokenizer, monkeypatch
):
    spec = spec_of(tmp_path)
    first, _ = run(spec, smollm2_tokenizer)
    cell = spec.cells[1]
    spec.result_path(cell).unlink()  # the process died after training, before the result was written
    assert cell_state(spec, cell).state == "trained"

    def no_training(*args, **kwargs):
        raise AssertionError("a trained cell must not be trained again")

    monkeypatch.setattr("omoe.train.trainer.train", no_training)
    (result,), lines = run(spec, smollm2_tokenizer)
    assert result["cell"] == cell.id and not result["train"]["trained_in_this_call"]
    assert scores(result) == scores(first[1])
    assert "reused the trained adapter" in lines[1] and "done, skipped" in lines[0]


def test_a_locked_cell_is_left_to_its_process_and_a_dead_process_lock_is_taken_over(
    tmp_path, smollm2_tokenizer
):
    spec = spec_of(tmp_path)
    lora, omoe = spec.cells
    locks = [c.work_dir.with_name(c.work_dir.name + ".lock") for c in spec.cells]
    locks[0].parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    locks[0].write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # alive
    locks[1].write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    assert cell_state(spec, lora).state == "running" and cell_state(spec, omoe).state == "todo"

    written, lines = run(spec, smollm2_tokenizer)
    assert [r["cell"] for r in written] == [omoe.id]
    assert "running in another process (pid" in lines[0] and not spec.result_path(lora).exists()
    assert locks[0].exists() and not locks[1].exists()  # the live lock is untouched, ours removed

    locks[0].write_text(json.dumps({"pid": dead.pid, "host": "another-host"}))  # cannot be checked
    assert run(spec, smollm2_tokenizer)[0] == []
    locks[0].unlink()
    (result,), _ = run(spec, smollm2_tokenizer)
    assert result["cell"] == lora.id and not any(p.exists() for p in locks)


def test_a_changed_config_makes_cells_stale_and_they_run_again(tmp_path, smollm2_tokenizer):
    spec = spec_of(tmp_path)
    run(spec, smollm2_tokenizer)
    data = copy.deepcopy(GRID)
    data["eval"]["limit"] = 1
    changed = spec_of(tmp_path, data)
    assert [cell_state(changed, c).state for c in changed.cells] == ["stale", "stale"]
    written, lines = run(changed, smollm2_tokenizer, only=["lora"])
    assert [r["cell"] for r in written] == ["lora__multi__seed0"]
    assert "result computed under another config; running it again" in lines[0]
    assert written[0]["metrics"]["boolq"]["label"]["n"] == 1
    assert [cell_state(changed, c).state for c in changed.cells] == ["done", "stale"]


# ---------------------------------------------------------------------------- bad input
def _bad(**changes):
    data = copy.deepcopy(GRID)
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split("/")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return data


BAD = [
    (_bad(epochs=3), "unknown key(s) epochs"),
    (_bad(methods={"lora": {"adapter.nope": 1}}), "unknown config key adapter.nope"),
    (_bad(methods={"lora": {"seed": 3}}), "seed is set by the grid"),
    (_bad(methods={"a__b": {}}), "method name 'a__b'"),
    (
        _bad(methods={"moe": {"adapter.num_experts": 2, "adapter.top_k": 4}}),
        "cell moe__multi__seed0: top_k=4 exceeds",
    ),
    (_bad(tasks=["boolq", "siqa"]), "unknown task 'siqa'"),
    (
        _bad(**{"base/data/prompt": "mixlora"}),
        "base: unknown data.prompt 'mixlora'; allowed: alpaca, moe-peft",
    ),
    (
        _bad(**{"base/data/prompt": "moe-peft"}),
        "cell lora__multi__moe-peft__seed0: protocol generate reads the alpaca prompt only",
    ),
    (_bad(settings=["single", "few-shot"]), "unknown setting 'few-shot'"),
    (_bad(eval={"protocols": ["vote"]}), "unknown protocol 'vote'"),
    (_bad(eval={"tasks": ["winogrande"], "split": "test"}), "task winogrande has no bundled 'test' split"),
    (_bad(sweep={"adapter.r,adapter.alpha": [[2, 4], [8]]}), "sweeps 2 keys together"),
    (_bad(**{"base/output_dir": "x"}), "base.output_dir is set by the grid"),
    (_bad(**{"base/optim": {"lr": -1}}), "base: optim.lr must be a finite number > 0"),
]


@pytest.mark.parametrize("data, message", BAD, ids=[m for _, m in BAD])
def test_bad_experiment_is_a_one_line_error_before_anything_is_written(tmp_path, capsys, data, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    code = main(["experiment", "--config", str(path), "--results-dir", str(tmp_path / "r"), "--work-dir",
                 str(tmp_path / "w")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_only_that_matches_nothing_and_broken_yaml_are_one_line_errors(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(GRID))
    broken = tmp_path / "broken.yaml"
    broken.write_text("methods: [unclosed\n")
    for argv, message in (
        (["--config", str(good), "--only", "dora*"], "--only dora* matches no cell of tiny"),
        (["--config", str(broken)], "is not valid YAML"),
        (["--config", str(tmp_path / "missing.yaml")], "config file not found"),
    ):
        code = main(
            ["experiment", *argv, "--results-dir", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w")]
        )
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists() and not (tmp_path / "w").exists()


def test_options_accept_none_as_the_name_of_an_orthogonal_layers_preset():
    assert load_config(None, {"adapter.orthogonal_layers": "none"}).adapter.orthogonal_layers == "none"
    with pytest.raises(ConfigError, match=r"optim\.lr must be a number"):
        load_config(None, {"optim.lr": "none"})


# ---------------------------------------------------------------------------- prompt formats
def test_moe_peft_cells_carry_the_format_in_their_id_training_and_evaluation(tmp_path, smollm2_tokenizer):
    data = {**copy.deepcopy(GRID), "eval": {"protocols": ["label"], "limit": 2, "batch_size": 2}}
    alpaca = spec_of(tmp_path, data)
    spec = build_experiment(copy.deepcopy(data), None, alpaca.results_dir, alpaca.work_dir, prompt="moe-peft")
    assert [c.id for c in spec.cells] == ["lora__multi__moe-peft__seed0", "omoe_top2__multi__moe-peft__seed0"]
    assert all(c.config.data.prompt == "moe-peft" for c in spec.cells)
    assert {c.fingerprint for c in spec.cells}.isdisjoint(c.fingerprint for c in alpaca.cells)
    written, _ = run(spec, smollm2_tokenizer, only=["lora"])
    result = written[0]
    assert result["eval"]["prompt"] == "moe-peft" and result["train_config"]["data"]["prompt"] == "moe-peft"
    assert set(result["metrics"]) == {"boolq", "ARC-Easy"}
    lines = (spec.cells[0].work_dir / "eval_predictions.jsonl").read_text().splitlines()
    preds = [json.loads(line) for line in lines]
    assert {p["prompt"] for p in preds} == {"moe-peft"}
    assert {tuple(p["scores"]) for p in preds if p["task"] == "ARC-Easy"} == {tuple("ABCDE")}
    from omoe.experiment.stats import read_records, records_path

    recs = read_records(records_path(spec.result_path(spec.cells[0])))
    assert all(r.gold_logprob is not None and (r.gold_logprob < 0).all() for r in recs.values())
    # the alpaca cells of the same file are untouched: other ids, still to run
    assert [cell_state(alpaca, c).state for c in alpaca.cells] == ["todo", "todo"]


def test_committed_results_keep_their_fingerprint_under_the_legacy_data_settings():
    """Keys added later (data.split, data.prompt, data.group_by_length) are left out of the
    fingerprint at the value that reproduces what the code did before them."""
    from omoe import options
    from omoe.experiment.spec import EvalOptions, fingerprint
    from omoe.train.config import TrainConfig

    path = ROOT / "results" / "smollm2-table2_multi_task" / "lora_r16__multi__seed0.json"
    saved = json.loads(path.read_text())
    assert "split" not in saved["train_config"]["data"]  # written before the key existed
    ev = options.build(EvalOptions, {k: saved["eval"][k] for k in ("protocols", "limit", "batch_size",
                                                                    "max_new_tokens", "num_beams")})  # fmt: skip
    data = copy.deepcopy(saved["train_config"])
    data["data"].update(split="train+val", group_by_length=False, prompt="alpaca")
    assert fingerprint(TrainConfig.from_dict(data), ev, saved["eval_tasks"]) == saved["fingerprint"]
    data["data"]["split"] = "train"  # the val slice left out: other training data, another fingerprint
    assert fingerprint(TrainConfig.from_dict(data), ev, saved["eval_tasks"]) != saved["fingerprint"]
