"""Resumable checkpoints, written atomically: a run killed at any moment resumes exactly.

A checkpoint is a directory ``output_dir/checkpoints/step-00000042/`` holding

- ``adapter_model.safetensors`` + ``adapter_config.json``: the adapter weights (safetensors);
- ``trainer_state.pt``: optimizer, scheduler, grad-scaler and RNG states, made of plain tensors,
  numbers, strings, lists, tuples and dicts only, so it loads with ``torch.load(weights_only=True)``
  (nothing is unpickled);
- ``trainer_state.json``: step, data position (epoch, index into that epoch's permutation), elapsed
  time, token count and the resolved config, readable by people and by the resume checks.

It is written into ``checkpoints/.tmp-step-...``, every file and the directory are fsynced, and the
directory is renamed into place, so a ``step-*`` directory is always complete; leftovers of an
interrupted write are removed by the next run. Only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from omoe.errors import AdapterLoadError, ConfigError
from omoe.train import fsdp
from omoe.utils import json_text

CHECKPOINTS = "checkpoints"
STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
WEIGHTS = "adapter_model.safetensors"
_NAME = re.compile(r"step-(\d+)")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def remove_partial(output_dir: str | Path) -> None:
    """Delete temporary directories left by a checkpoint write that was interrupted."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA generator states as weights_only-loadable objects."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------- optimizer and adapter
def optimizer_state(optimizer: torch.optim.Optimizer, names: list[str]) -> dict:
    """The optimizer's state keyed by parameter name, with full tensors (gathered under FSDP).

    Collective under FSDP: every process must call it. ``names[i]`` names the optimizer's i-th parameter.
    """
    sd = optimizer.state_dict()
    state = {
        names[i]: {k: fsdp.full(v).detach().cpu() if torch.is_tensor(v) else v for k, v in s.items()}
        for i, s in sd["state"].items()
    }
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    extra = {k: v for k, v in sd.items() if k not in ("state", "param_groups")}  # e.g. projector statistics
    return {**extra, "state": state, "param_groups": groups}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, params: list, names: list[str], saved: dict
) -> None:
    """Inverse of :func:`optimizer_state` (tensors re-sharded like their parameters under FSDP)."""
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(saved["state"]) - set(index))
    if unknown:
        raise ConfigError(
            f"checkpoint optimizer state names parameter {unknown[0]!r}, which this model lacks"
        )
    state = {
        index[n]: {k: fsdp.like(v, params[index[n]]) if torch.is_tensor(v) else v for k, v in s.items()}
        for n, s in saved["state"].items()
    }
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in saved["param_groups"]]
    extra = {k: v for k, v in saved.items() if k not in ("state", "param_groups")}
    optimizer.load_state_dict({**extra, "state": state, "param_groups": groups})


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """Full CPU copies of the adapter's tensors (collective under FSDP)."""
    return {k: fsdp.full(v).detach().cpu().contiguous() for k, v in model.adapter_state_dict().items()}


# ---------------------------------------------------------------------------- save / load
def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model,
    tensors_state: dict,
    info: dict,
    keep: int,
    adapter: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``.

    Args:
        model: the :class:`~omoe.tuners.model.OMoEModel` (its adapter weights are saved).
        tensors_state: optimizer/scheduler/scaler/RNG states (plain containers of tensors and numbers).
        info: JSON-serialisable run state (step, data position, config, ...).
        adapter: gathered adapter tensors (under FSDP); None = take them from ``model``.
    """
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=root))
    try:
        model.save_pretrained(tmp, state_dict=adapter)
        buffer = io.BytesIO()
        torch.save(tensors_state, buffer)  # torch's own writer would turn a full disk into a RuntimeError
        _write_bytes(tmp / STATE_PT, buffer.getbuffer())
        (tmp / STATE_JSON).write_text(json_text(info, indent=2) + "\n")
        for p in tmp.iterdir():
            _fsync_file(p)
        tmp.chmod(0o755)
        _fsync_dir(tmp)
        if final.exists():  # a rerun of the same step after a resume: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model) -> tuple[dict, dict]:
    """Load the adapter weights into ``model`` (not yet sharded); return ``(tensors_state, info)``.

    ``trainer_state.pt`` is read with ``weights_only=True``: a file holding anything but tensors and
    plain containers is refused rather than unpickled.
    """
    path = Path(path)
    for name in (WEIGHTS, STATE_PT, STATE_JSON):
        if not (path / name).is_file():
            raise ConfigError(f"checkpoint {path} is incomplete: no {name}")
    try:
        info = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        weights = load_file(path / WEIGHTS, device="cpu")
    except (ValueError, SafetensorError, OSError) as err:  # JSONDecodeError, UnicodeDecodeError
        raise AdapterLoadError(f"checkpoint {path} is damaged: {' '.join(str(err).split())}") from None
    model.load_adapter_state_dict(weights, source=str(path / WEIGHTS))  # refuses NaN/inf tensors
    try:
        state = torch.load(path / STATE_PT, map_location="cpu", weights_only=True)
    except Exception as err:  # an UnpicklingError names the offending global
        raise ConfigError(f"cannot load {path / STATE_PT} with weights_only=True: {err}") from None
    return state, info


def load_latest_checkpoint(output_dir: str | Path, model, say=print) -> tuple[Path, dict, dict]:
    """Load the newest checkpoint of ``output_dir`` that loads: one that is damaged (truncated,
    unreadable, holding NaN) is skipped, and ``say`` is told so; ``(path, tensors_state, info)``."""
    found = list_checkpoints(output_dir)
    for i, path in enumerate(reversed(found)):
        try:
            state, info = load_checkpoint(path, model)
        except (AdapterLoadError, ConfigError) as err:
            older = "falling back to the previous one" if i + 1 < len(found) else "no older one is left"
            say(f"checkpoint {path.name} cannot be loaded ({err}); {older}")
            continue
        return path, state, info
    raise ConfigError(
        f"--resume: none of the {len(found)} checkpoint(s) in {checkpoint_root(output_dir)} loads "
        "(each reason is printed above)"
    )


def _write_bytes(path: Path, data) -> None:
    """Write ``data`` with a Python file object, so that a full disk is an ``OSError(ENOSPC)``."""
    with open(path, "wb") as f:
        f.write(data)


def _fsync_file(path: Path) -> None:
    if path.is_dir():
        for p in path.iterdir():
            _fsync_file(p)
        _fsync_dir(path)
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)
