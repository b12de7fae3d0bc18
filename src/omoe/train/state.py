"""A run's state on disk: what its ``output_dir`` may already hold, what a checkpoint keeps of the
trainer, and what a resume may change.

A run starts in an ``output_dir`` that holds no finished or checkpointed run, unless it resumes
one; a resume continues the same run, so its config may differ from the checkpoint's only in the
keys that do not change the numbers (:data:`omoe.train.config.RESULT_FREE_KEYS`). The checkpoint
files themselves (atomic writes, the weights_only load) are :mod:`omoe.train.checkpoint`'s.
"""

from __future__ import annotations

from pathlib import Path

from omoe.errors import ConfigError
from omoe.train import checkpoint as ckpt
from omoe.train.config import RESULT_FREE_KEYS, TrainConfig
from omoe.tuners.model import WEIGHTS_NAME
from omoe.utils import flatten


def check_output_dir(out: Path, resume: bool) -> Path | None:
    """The newest checkpoint to resume from (``resume``), or None for a fresh run; a ConfigError
    for a resume with no checkpoint, or a fresh run over a finished or checkpointed one."""
    latest = ckpt.latest_checkpoint(out)
    if resume:
        if latest is None:
            raise ConfigError(
                f"--resume: no checkpoint in {out / ckpt.CHECKPOINTS} (checkpoints are written every "
                "checkpoint_every steps; 0 writes none)"
            )
        return latest
    if latest is not None or (out / WEIGHTS_NAME).exists():
        raise ConfigError(
            f"output_dir {out} already holds a training run; pass --resume to continue it, "
            "or choose another output_dir"
        )
    return None


def training_state(optimizer, names: list[str], scheduler, scaler) -> dict:
    """``trainer_state.pt``'s content: the optimizer state keyed by parameter name (gathered under
    FSDP: every process calls this), the scheduler, grad-scaler and RNG states."""
    return {
        "optimizer": ckpt.optimizer_state(optimizer, names),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        "rng": ckpt.rng_state(),
    }


def restore_training_state(state: dict, optimizer, params, names: list[str], scheduler, scaler) -> None:
    """Put :func:`training_state`'s ``state`` back into a run's optimizer, scheduler, scaler and RNGs."""
    ckpt.load_optimizer_state(optimizer, params, names, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    ckpt.set_rng_state(state["rng"])


def check_resumable(saved: dict, config: TrainConfig, path: Path) -> None:
    """Refuse to resume checkpoint ``path`` (whose ``trainer_state.json`` is ``saved``) with a
    config that differs from its own in a key that changes the numbers."""
    old, new = flatten(saved["config"]), flatten(config.to_dict())
    differ = [
        k for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and not k.startswith(RESULT_FREE_KEYS)
    ]  # fmt: skip
    if differ:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in differ)
        raise ConfigError(
            f"cannot resume {path}: the config differs in {shown}; a resume continues the same run "
            "(start a new output_dir to change them)"
        )
