"""Data parallel training over 2 CPU processes (gloo): torchrun (DDP-style) and accelerate + FSDP2.

18 records in global batches of 8 make 3 steps per epoch, the last of 2 examples = 1 micro-batch, so
one process has nothing to do on that step (zero gradients under DDP, a weight-0 micro-batch under
FSDP). The loss curve and the final adapter must match a 1-process run with the same global batch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from omoe.train import checkpoint as ckpt
from omoe.train import train
from omoe.train.config import load_config
from omoe.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SETTINGS = {
    "data.tasks": ["boolq"],
    "data.limit": 18,
    "data.cutoff_len": 32,
    "data.train_on_inputs": True,
    "optim.global_batch_size": 8,
    "optim.micro_batch_size": 2,
    "optim.max_steps": 6,
    "optim.warmup_steps": 2,
    "optim.lr": 1e-3,
    "adapter.dropout": 0.1,
    "logging.progress": False,
    "logging.tensorboard": False,
    "device": "cpu",
}
LOSS_TOL = 1e-4  # 1 vs 2 processes sum the same terms in a different order (and with 1 vs 2 threads)


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    return train(load_config(None, {**SETTINGS, "model": str(tiny_model_dir), "output_dir": str(out)}))


def _launch(launcher: list[str], config_path: Path, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, "-m", "omoe.cli.main", "train", "--config", str(config_path), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _write_config(tmp_path: Path, model_dir: Path, name: str, **overrides) -> Path:
    config = load_config(
        None, {**SETTINGS, "model": str(model_dir), "output_dir": str(tmp_path / name), **overrides}
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(config.to_yaml())
    return path


def _compare(one, out_dir: Path) -> tuple[float, float]:
    """(max loss difference over the curve, max adapter weight difference) against the 1-process run."""
    a, b = read_metrics(one.output_dir / "metrics.jsonl"), read_metrics(out_dir / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    loss_diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
    wa, wb = (
        load_file(one.output_dir / "adapter_model.safetensors"),
        load_file(out_dir / "adapter_model.safetensors"),
    )
    assert wa.keys() == wb.keys()
    return loss_diff, max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_two_torchrun_processes_follow_the_one_process_loss_curve(tmp_path, tiny_model_dir, one_process):
    config = _write_config(tmp_path, tiny_model_dir, "ddp")
    _launch([str(BIN / "torchrun"), "--nproc_per_node", "2"], config)
    out = tmp_path / "ddp"
    summary = (out / "train_results.json").read_text()
    assert '"world_size": 2' in summary
    loss_diff, weight_diff = _compare(one_process, out)
    print(f"DDP 2 processes vs 1: max loss diff {loss_diff:.2e}, max weight diff {weight_diff:.2e}")
    assert loss_diff <= LOSS_TOL
    assert weight_diff <= 1e-4


@pytest.mark.slow
def test_accelerate_fsdp_config_shards_and_follows_the_one_process_loss_curve(
    tmp_path, tiny_model_dir, one_process
):
    config = _write_config(tmp_path, tiny_model_dir, "fsdp")
    accelerate = [
        str(BIN / "accelerate"),
        "launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate_fsdp.yaml"),
    ]
    _launch(accelerate, config)
    out = tmp_path / "fsdp"
    assert '"world_size": 2' in (out / "train_results.json").read_text()
    loss_diff, weight_diff = _compare(one_process, out)
    print(f"FSDP 2 processes vs 1: max loss diff {loss_diff:.2e}, max weight diff {weight_diff:.2e}")
    assert loss_diff <= LOSS_TOL
    assert weight_diff <= 1e-4


@pytest.mark.slow
def test_an_fsdp_checkpoint_resumes_in_one_process(tmp_path, tiny_model_dir, one_process):
    """Checkpoints hold gathered tensors keyed by name, so FSDP -> 1 process resumes the same run."""
    config = _write_config(tmp_path, tiny_model_dir, "mixed", checkpoint_every=3)
    _launch([str(BIN / "torchrun"), "--nproc_per_node", "2"], config, "--fsdp", "true")
    out = tmp_path / "mixed"
    # forget everything after step 3, then continue alone
    shutil.rmtree(out / ckpt.CHECKPOINTS / "step-00000006")
    (out / "adapter_model.safetensors").unlink()
    train(load_config(config), resume=True)
    loss_diff, weight_diff = _compare(one_process, out)
    print(
        f"FSDP (steps 1-3) + 1 process (4-6) vs 1: max loss diff {loss_diff:.2e}, weight diff {weight_diff:.2e}"
    )
    assert loss_diff <= LOSS_TOL
    assert weight_diff <= 1e-4


ORTHOGONAL = {
    "adapter.method": "moe",
    "optim.optimizer": "orthogonal",
    "optim.orthogonal.accumulate_steps": 2,
    "optim.orthogonal.warmup_steps": 1,
}


def test_two_torchrun_processes_gather_the_orthogonal_statistics_like_one_process(tmp_path, tiny_model_dir):
    """Accumulating steps 2-3, orthogonal step 4: on step 3 (2 examples) process 1 runs no micro-batch and
    contributes no means to the gathered statistics."""
    one = train(
        load_config(
            None,
            {**SETTINGS, **ORTHOGONAL, "model": str(tiny_model_dir), "output_dir": str(tmp_path / "one")},
        )
    )
    config = _write_config(tmp_path, tiny_model_dir, "ddp-orth", **ORTHOGONAL)
    _launch([str(BIN / "torchrun"), "--nproc_per_node", "2"], config)
    loss_diff, weight_diff = _compare(one, tmp_path / "ddp-orth")
    print(
        f"orthogonal, DDP 2 processes vs 1: max loss diff {loss_diff:.2e}, max weight diff {weight_diff:.2e}"
    )
    assert loss_diff <= LOSS_TOL
    assert weight_diff <= 1e-4
