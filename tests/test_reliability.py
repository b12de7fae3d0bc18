"""No silent garbage (issue 13): non-finite numbers stop the run with one line that names where they
are, every JSON written is strict, and injected faults (SIGKILL during a checkpoint write, a full
disk, a damaged newest checkpoint, two experiment workers on one grid) lose nothing and leave no
partial file under a final name. The bad-input table of docs/reliability.md is tests/test_bad_inputs.py."""

from __future__ import annotations

import ast
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from omoe import OMoEConfig, OMoEModel, get_omoe_model
from omoe.cli.main import main
from omoe.data.loader import load_task
from omoe.errors import AdapterLoadError, NonFiniteError
from omoe.eval.evaluate import evaluate
from omoe.models.testing import tiny_llama
from omoe.train import checkpoint as ckpt
from omoe.train import train
from omoe.train import trainer as trainer_module
from omoe.train.config import load_config
from omoe.utils import json_text

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "adapter_model.safetensors"

# The tiny training run of tests/test_train.py: boolq cut to 32 tokens, 4 examples a step.
TINY = {
    "data.tasks": ["boolq"],
    "data.limit": 8,
    "data.cutoff_len": 32,
    "data.train_on_inputs": True,
    "optim.global_batch_size": 4,
    "optim.micro_batch_size": 2,
    "optim.max_steps": 4,
    "optim.warmup_steps": 1,
    "optim.lr": 1e-3,
    "adapter.dropout": 0.1,
    "logging.progress": False,
    "logging.tensorboard": False,
    "device": "cpu",
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(tmp_path, name="run", **overrides):
    return load_config(None, {**TINY, "output_dir": str(tmp_path / name), **overrides})


def run_tiny(tmp_path, tokenizer, name="run", **overrides):
    return train(tiny_config(tmp_path, name, **overrides), model=tiny_llama(0), tokenizer=tokenizer)


def nan_model(method="lora"):
    """The tiny LLaMA with an adapter whose weights are all NaN (bypassing the loader's check)."""
    model = get_omoe_model(tiny_llama(0), OMoEConfig(method=method, r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "omoe_" in name:
                p.fill_(float("nan"))
    return model


# ---------------------------------------------------------------------------- adapters
def test_an_adapter_holding_one_nan_is_refused_naming_the_tensor_and_the_file(tmp_path):
    get_omoe_model(tiny_llama(0), OMoEConfig(method="lora", r=4)).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    key = sorted(tensors)[3]
    tensors[key].view(-1)[1] = float("nan")
    save_file(tensors, tmp_path / WEIGHTS)
    with pytest.raises(AdapterLoadError) as err:
        OMoEModel.from_pretrained(tiny_llama(0), tmp_path)
    message = str(err.value)
    assert f"tensor {key!r} holds 1 non-finite value(s)" in message
    assert str(tmp_path / WEIGHTS) in message and "\n" not in message


# ---------------------------------------------------------------------------- evaluation
@pytest.mark.parametrize("protocol", ["label", "loglik"])
def test_evaluation_stops_at_the_first_nan_score_naming_task_and_record(smollm2_tokenizer, protocol):
    records = load_task("boolq", limit=3)
    with pytest.raises(NonFiniteError) as err:
        evaluate(nan_model(), smollm2_tokenizer, "boolq", records, protocol, progress=False)
    message = str(err.value)
    assert message.startswith("boolq record 0: ") and "nan" in message and "\n" not in message


def test_a_nan_score_of_one_record_is_named_and_no_prediction_is_made(smollm2_tokenizer, monkeypatch):
    from omoe.eval import label

    real = label.next_token_scores

    def one_nan(*args, **kwargs):
        scores = real(*args, **kwargs)  # (N, labels)
        scores[2, 1] = float("inf")
        return scores

    monkeypatch.setattr(label, "next_token_scores", one_nan)
    with pytest.raises(NonFiniteError, match=r"^boolq record 2: label scores .* false inf; no prediction"):
        evaluate(
            tiny_llama(0), smollm2_tokenizer, "boolq", load_task("boolq", limit=4), "label", progress=False
        )


# ---------------------------------------------------------------------------- strict JSON
def test_json_text_refuses_nan_and_inf_naming_the_key():
    assert json_text({"a": [1.5, {"b": None}]}) == '{"a": [1.5, {"b": null}]}'
    for bad, where in ((float("nan"), "tasks.boolq.1 is nan"), (float("-inf"), "tasks.boolq.1 is -inf")):
        with pytest.raises(NonFiniteError, match=rf"^{where}; strict JSON cannot hold it$"):
            json_text({"tasks": {"boolq": [0.5, bad]}})


def _json_calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("dump", "dumps")
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "json"
        ):
            yield node


# json.dumps used as a hash key or fingerprint, never written: the value is compared, not read back.
HASHING = {"src/omoe/experiment/spec.py", "src/omoe/experiment/stats.py"}


def test_every_json_the_project_writes_is_strict():
    """Every json.dump(s) in src/ and scripts/ passes allow_nan=False (omoe.utils.json_text does,
    and names the key); the hashing uses listed in HASHING are the only exceptions."""
    loose = []
    for path in sorted([*ROOT.glob("src/**/*.py"), *ROOT.glob("scripts/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        for call in _json_calls(path):
            strict = any(
                k.arg == "allow_nan" and isinstance(k.value, ast.Constant) and k.value.value is False
                for k in call.keywords
            )
            if not strict and rel not in HASHING:
                loose.append(f"{rel}:{call.lineno}")
    assert loose == [], f"json.dump(s) without allow_nan=False (use omoe.utils.json_text): {loose}"


# ---------------------------------------------------------------------------- training
class _NanGradient(torch.autograd.Function):
    """Identity forward; NaN gradient backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _poison_from_call(monkeypatch, first_bad_call: int, how):
    real = trainer_module.token_loss_sum
    calls = [0]

    def poisoned(*args, **kwargs):
        calls[0] += 1
        lm = real(*args, **kwargs)
        return how(lm) if calls[0] >= first_bad_call else lm

    monkeypatch.setattr(trainer_module, "token_loss_sum", poisoned)


def test_a_nan_loss_stops_training_naming_the_step_and_keeps_the_last_good_state(
    tmp_path, smollm2_tokenizer, monkeypatch
):
    """checkpoint_every 0 writes no checkpoint, yet the state after step 2 is kept when step 3's
    loss is NaN (2 micro-batches a step: call 5 is step 3's first), and it equals a clean run's."""
    reference = run_tiny(tmp_path, smollm2_tokenizer, "ref", checkpoint_every=1, keep_checkpoints=4)
    _poison_from_call(monkeypatch, 5, lambda lm: lm * float("nan"))
    with pytest.raises(NonFiniteError) as err:
        run_tiny(tmp_path, smollm2_tokenizer, "nan", checkpoint_every=0)
    kept = tmp_path / "nan" / ckpt.CHECKPOINTS / "step-00000002"
    assert str(err.value) == (
        f"the loss is nan at step 3; the last good state is checkpoint {kept} (lower optim.lr, or train in fp32)"
    )
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "nan")] == ["step-00000002"]
    assert not (tmp_path / "nan" / WEIGHTS).exists()
    good = load_file(reference.output_dir / ckpt.CHECKPOINTS / "step-00000002" / WEIGHTS)
    assert all(torch.equal(good[k], v) for k, v in load_file(kept / WEIGHTS).items())
    rows = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # the NaN step is not logged


def test_a_nan_gradient_norm_stops_training_with_a_finite_loss(tmp_path, smollm2_tokenizer, monkeypatch):
    _poison_from_call(monkeypatch, 3, _NanGradient.apply)
    with pytest.raises(
        NonFiniteError, match=r"^the gradient norm is nan \(the loss was \d+\.\d{4}\) at step 2; "
    ):
        run_tiny(tmp_path, smollm2_tokenizer, checkpoint_every=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-00000001"]


def test_under_fp16_grad_scaling_an_overflowing_gradient_is_a_skipped_step_not_an_error():
    assert trainer_module.non_finite_step(2.5, float("inf"), grad_scaling=True) is None
    assert trainer_module.non_finite_step(2.5, float("inf"), grad_scaling=False).startswith(
        "the gradient norm is inf"
    )
    assert trainer_module.non_finite_step(float("nan"), 1.0, grad_scaling=True) == "the loss is nan"


# ---------------------------------------------------------------------------- faults
KILL_DURING_SECOND_CHECKPOINT = """
import os, signal, sys
from omoe.train import checkpoint as ckpt, train
from omoe.train.config import load_config

real, calls = ckpt._write_bytes, []

def write(path, data):
    calls.append(path)
    if len(calls) == 2:  # the adapter is already in the temporary directory; half the state follows
        with open(path, "wb") as f:
            f.write(bytes(data)[: len(data) // 2])
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, data)

ckpt._write_bytes = write
train(load_config(sys.argv[1]))
"""


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one_and_resume_is_exact(
    tmp_path, tiny_model_dir
):
    settings = {**TINY, "model": str(tiny_model_dir), "checkpoint_every": 2, "optim.max_steps": 6}
    reference = train(load_config(None, {**settings, "output_dir": str(tmp_path / "ref")}))
    killed = load_config(None, {**settings, "output_dir": str(tmp_path / "killed")})
    (tmp_path / "killed.yaml").write_text(killed.to_yaml())
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SECOND_CHECKPOINT, str(tmp_path / "killed.yaml")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    root = tmp_path / "killed" / ckpt.CHECKPOINTS
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "killed")] == ["step-00000002"]
    assert any(p.name.startswith(".tmp-step-00000004") for p in root.iterdir())  # the torn write
    ckpt.load_checkpoint(root / "step-00000002", get_omoe_model(tiny_llama(0), killed.adapter))

    resumed = train(killed, resume=True)
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())
    ref, res = load_file(reference.output_dir / WEIGHTS), load_file(resumed.output_dir / WEIGHTS)
    assert all(torch.equal(ref[k], res[k]) for k in ref)


def _full_disk_after(limit: int):
    """A writer whose file object takes ``limit`` bytes, then raises ENOSPC (as a full disk does)."""

    class FullDisk:
        def __init__(self, path):
            self.path, self.f = path, open(path, "wb")  # noqa: SIM115

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            room = limit - self.f.tell()
            self.f.write(bytes(data)[: max(0, room)])
            if len(data) > room:
                self.f.close()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
            return len(data)

    return FullDisk


def test_a_full_disk_during_a_checkpoint_stops_training_with_one_line_and_no_partial_checkpoint(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    writer = _full_disk_after(100)
    monkeypatch.setattr(ckpt, "open", lambda path, mode: writer(path), raising=False)  # trainer_state.pt
    out = tmp_path / "run"
    config = tiny_config(tmp_path, model=str(tiny_model_dir), checkpoint_every=1)
    (tmp_path / "c.yaml").write_text(config.to_yaml())
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("omoe train: error: [Errno 28] No space left on device: ")
    assert sum(line.startswith("omoe train: error") for line in err) == 1
    assert list((out / ckpt.CHECKPOINTS).iterdir()) == [] and not (out / WEIGHTS).exists()


def test_a_full_disk_while_writing_results_exits_1_and_leaves_no_results_file(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    real = Path.write_text

    def full(self, data, *args, **kwargs):
        if self.name.startswith(".res.json."):  # atomic_write's temporary file for res.json
            real(self, data[:50], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "res.json"
    argv = ["eval", "--model", str(tiny_model_dir), "--tasks", "boolq", "--protocol", "label", "--limit", "2"]
    assert main([*argv, "--output", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("omoe eval: error: [Errno 28] No space left on device: ")
    assert sum(line.startswith("omoe eval: error") for line in err) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".res.json.")]


def test_a_damaged_newest_checkpoint_is_skipped_and_resume_falls_back_to_the_previous_one(
    tmp_path, smollm2_tokenizer, capsys
):
    reference = run_tiny(tmp_path, smollm2_tokenizer, "ref", checkpoint_every=1, keep_checkpoints=4)
    # the state of a run killed after step 3: checkpoints 1-3, no final adapter; step 3's is truncated
    shutil.copytree(reference.output_dir, tmp_path / "run")
    for name in (WEIGHTS, "adapter_config.json", "train_results.json"):
        (tmp_path / "run" / name).unlink()
    shutil.rmtree(tmp_path / "run" / ckpt.CHECKPOINTS / "step-00000004")
    damaged = tmp_path / "run" / ckpt.CHECKPOINTS / "step-00000003" / WEIGHTS
    damaged.write_bytes(damaged.read_bytes()[:200])
    capsys.readouterr()

    resumed = train(tiny_config(tmp_path), model=tiny_llama(0), tokenizer=smollm2_tokenizer, resume=True)
    err = capsys.readouterr().err
    assert "omoe train: checkpoint step-00000003 cannot be loaded (checkpoint " in err
    assert "is damaged: " in err and "); falling back to the previous one" in err
    assert "resuming from " + str(tmp_path / "run" / ckpt.CHECKPOINTS / "step-00000002") in err
    ref, res = load_file(reference.output_dir / WEIGHTS), load_file(resumed.output_dir / WEIGHTS)
    assert all(torch.equal(ref[k], res[k]) for k in ref)


@pytest.mark.slow  # two processes each import torch and run 4 cells: ~15 s on 2 busy cores
def test_two_experiment_workers_on_one_grid_run_every_cell_once_and_lose_no_result(tmp_path, tiny_model_dir):
    grid = {
        "name": "two-workers",
        "base": {
            "model": str(tiny_model_dir), "device": "cpu", "checkpoint_every": 0,
            "data": {"limit": 4, "cutoff_len": 32, "train_on_inputs": True},
            "optim": {"global_batch_size": 4, "micro_batch_size": 4, "max_steps": 1, "warmup_steps": 0},
            "logging": {"progress": False, "tensorboard": False},
        },
        "tasks": ["boolq"],
        "settings": ["single"],
        "methods": {"lora": {"adapter.method": "lora", "adapter.r": 2}, "dora": {"adapter.method": "dora", "adapter.r": 2}},
        "seeds": [0, 1],
        "eval": {"protocols": ["label"], "limit": 2, "batch_size": 2},
    }  # fmt: skip
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    argv = [sys.executable, "-m", "omoe.cli.main", "experiment", "--config", str(tmp_path / "grid.yaml"),
            "--results-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path / "runs"), "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]  # fmt: skip
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [e[-2000:] for _, e in outputs]
    lines = [line for out, _ in outputs for line in out.splitlines() if line.startswith("[")]
    ran = sorted(line.split()[1].rstrip(":") for line in lines if ": trained " in line)
    results = sorted((tmp_path / "results").glob("*.json"))
    assert len(results) == 4, lines
    cells = sorted(json.loads(p.read_text())["cell"] for p in results)
    assert ran == cells, lines  # every cell trained by exactly one worker
    assert not list((tmp_path / "runs").glob("*.lock"))
