"""Run the cells of an experiment: train (or resume), evaluate, write one result JSON per cell.

A cell's state is read from disk, so a killed sweep continues where it stopped:

- ``done``: ``results_dir/<cell>.json`` exists and was computed under the same config: skipped;
- ``stale``: a result or a work dir from another config (the YAML changed): both are removed and
  the cell runs again;
- ``trained``: the work dir holds the finished adapter (killed during evaluation): evaluated only;
- ``checkpoint``: the work dir holds a checkpoint: training resumes from it (``train(resume=True)``);
- ``todo``: anything else (a work dir with nothing resumable in it is cleared first);
- ``running``: another live process holds the cell's lock (``<work dir>.lock``): skipped.

Several ``omoe experiment`` processes can share one grid (two GPUs, two machines on a shared disk):
each takes a cell by creating its lock file exclusively, reads the cell's state afresh under it, and
removes the lock when the cell ends. A lock whose process has died on this host is taken over; one
from another host is respected until its file is removed.

The base model is loaded once and reused: after each cell the adapter layers are removed again
(``OMoEModel.unload``), which restores the original modules.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from omoe.data.loader import load_task
from omoe.data.prompts import render_many
from omoe.errors import ConfigError
from omoe.eval.evaluate import evaluate
from omoe.eval.run import load_adapter, versions
from omoe.experiment.results import RESULT_KIND as RESULT_KIND  # re-exported
from omoe.experiment.results import CellResult, EvalSummary, Score, TrainSummary, WallSeconds
from omoe.experiment.spec import Cell, ExperimentSpec, fingerprint
from omoe.experiment.stats import records_path, records_payload, write_records
from omoe.models import load_model
from omoe.train import checkpoint as ckpt
from omoe.train import trainer
from omoe.train.config import TrainConfig, load_config
from omoe.train.metrics import JSONL, read_metrics
from omoe.train.trainer import CONFIG_FILE, RESULTS_FILE
from omoe.tuners.model import WEIGHTS_NAME
from omoe.utils import atomic_write_text, json_text

PREDICTIONS = "eval_predictions.jsonl"


@dataclass
class CellState:
    state: str  # done | stale | trained | checkpoint | todo | running
    detail: str = ""


def cell_state(spec: ExperimentSpec, cell: Cell, *, locks: bool = True) -> CellState:
    """What is on disk for ``cell`` (see the module docstring); ``locks=False`` ignores a lock (the
    caller holds it)."""
    holder = _live_holder(_lock_path(cell)) if locks else None
    if holder is not None:
        return CellState("running", f"locked by {holder}")
    result = spec.result_path(cell)
    if result.exists():
        try:
            saved = CellResult.from_dict(json.loads(result.read_text(encoding="utf-8")), str(result))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ConfigError):
            return CellState("stale", "unreadable result file")
        if saved.fingerprint == cell.fingerprint:
            return CellState("done", _metrics_line(saved))
        return CellState("stale", "result computed under another config")
    work = cell.work_dir

    if (work / RESULTS_FILE).is_file() and (work / WEIGHTS_NAME).is_file():
        if _same_training(lambda: load_config(work / CONFIG_FILE), cell):
            return CellState("trained", "adapter trained, not yet evaluated")
        return CellState("stale", "work dir trained under another config")
    for checkpoint in reversed(ckpt.list_checkpoints(work)):  # newest first
        try:
            meta = json.loads((checkpoint / ckpt.STATE_JSON).read_text(encoding="utf-8"))
            saved = TrainConfig.from_dict(meta["config"])
        except (OSError, ValueError, KeyError, TypeError):  # ConfigError is a ValueError
            continue  # damaged: the trainer skips it too and resumes from an older one
        if _same_training(lambda saved=saved: saved, cell):
            steps = cell.config.optim.max_steps
            return CellState(
                "checkpoint", f"resumes from {checkpoint.name}" + (f" of {steps}" if steps else "")
            )
        return CellState("stale", "checkpoint from another config")
    return CellState("todo")


def _lock_path(cell: Cell) -> Path:
    return cell.work_dir.with_name(cell.work_dir.name + ".lock")


def _live_holder(path: Path) -> str | None:
    """``pid N on HOST`` of the process holding the lock at ``path``; None if there is no lock or its
    process is gone (same host only: another host's lock is taken as live)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        pid, host = int(info["pid"]), str(info["host"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return f"an unreadable lock file {path}"  # being written, or damaged: not ours to remove
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, another user's
    return f"pid {pid} on {host}"


@contextmanager
def cell_lock(cell: Cell) -> Iterator[str | None]:
    """Hold ``cell``'s lock for the block; yields None when held, else who holds it. A dead
    process's lock on this host is removed and taken."""
    path = _lock_path(cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = json_text({"pid": os.getpid(), "host": socket.gethostname(), "since": _now()})
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _live_holder(path)
            if holder is not None:
                yield holder
                return
            path.unlink(missing_ok=True)  # stale: its process died without removing it
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(info)
        try:
            yield None
        finally:
            path.unlink(missing_ok=True)
        return
    yield f"a lock file {path} that keeps reappearing"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _same_training(read_config, cell: Cell) -> bool:
    try:
        return fingerprint(read_config()) == fingerprint(cell.config)
    except (OSError, ValueError, KeyError, TypeError):  # ConfigError is a ValueError
        return False


class BaseModels:
    """The base model and tokenizer, loaded once per model name (or given) and shared by the cells."""

    def __init__(self, model=None, tokenizer=None):
        self.given = model is not None
        self.name: str | None = None
        self.model, self.tokenizer = model, tokenizer

    def get(self, config: TrainConfig):
        """``(model, tokenizer, seconds spent loading)``: a fresh load when the name changes or the
        last cell may have changed the model (gradient checkpointing, FSDP)."""
        reusable = not (config.gradient_checkpointing or config.fsdp)
        if self.given or (self.model is not None and self.name == config.model and reusable):
            return self.model, self.tokenizer, 0.0
        t0 = time.perf_counter()
        self.model = self.tokenizer = None
        self.model, self.tokenizer = load_model(config.model)
        self.name = config.model if reusable else None
        return self.model, self.tokenizer, time.perf_counter() - t0

    def forget(self) -> None:
        """After a failure the shared model may still hold adapter layers: load it afresh next time."""
        if not self.given:
            self.model = self.tokenizer = self.name = None


def run_experiment(
    spec: ExperimentSpec,
    only: list[str] | None = None,
    *,
    model=None,
    tokenizer=None,
    progress: bool = True,
    echo=print,
) -> list[dict]:
    """Run the selected cells that are not done; return the results written in this call, as the
    JSON objects of their files (:meth:`CellResult.to_dict`).

    ``model``/``tokenizer``: an in-memory base model to use for every cell instead of loading
    ``base.model`` (tests). ``echo`` receives one progress line per cell.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("omoe experiment runs in one process; use omoe train under torchrun for one cell")
    cells = spec.select(only)
    records = _eval_records(spec, cells)  # bad test data fails before any training
    bases = BaseModels(model, tokenizer)
    written = []
    for i, cell in enumerate(cells, 1):
        tag = f"[{i}/{len(cells)}] {cell.id}"
        with cell_lock(cell) as holder:
            if holder is not None:
                echo(f"{tag}: running in another process ({holder}), skipped")
                continue
            result = _run_locked(spec, cell, bases, records, progress, tag, echo)
        if result is not None:
            written.append(result.to_dict())
            echo(f"{tag}: {_summary_line(result)}")
    return written


def _run_locked(
    spec, cell: Cell, bases: BaseModels, records, progress: bool, tag: str, echo
) -> CellResult | None:
    """Run ``cell`` under its lock, from its state read now (another process may have finished it)."""
    state = cell_state(spec, cell, locks=False)
    if state.state == "done":
        echo(f"{tag}: done, skipped ({state.detail})")
        return None
    if state.state in ("stale", "todo"):
        if state.state == "stale":
            echo(f"{tag}: {state.detail}; running it again")
            spec.result_path(cell).unlink(missing_ok=True)
            records_path(spec.result_path(cell)).unlink(missing_ok=True)
        if cell.work_dir.exists():
            shutil.rmtree(cell.work_dir)  # nothing resumable in it
    try:
        return run_cell(spec, cell, state, bases, records, progress)
    except BaseException:
        bases.forget()
        raise


def run_cell(
    spec: ExperimentSpec, cell: Cell, state: CellState, bases: BaseModels, records, progress: bool
) -> CellResult:
    """Train (or resume, or reuse) and evaluate one cell; write its result JSON atomically."""
    start = time.perf_counter()
    config = _with_progress(cell.config, progress)
    base, tokenizer, load_s = bases.get(config)
    t0 = time.perf_counter()
    if state.state == "trained":
        model = load_adapter(base, cell.work_dir).to(_device(config.device))
    else:
        model = trainer.train(
            config, model=base, tokenizer=tokenizer, resume=state.state == "checkpoint"
        ).model
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    try:
        metrics, predictions = _evaluate(spec, cell, model, tokenizer, records, config.data.prompt, progress)
    finally:
        model.unload()  # the shared base model gets its original modules back
    eval_s = time.perf_counter() - t0

    params, trained = _training_summary(cell.work_dir, trained_now=state.state != "trained")
    result = CellResult(
        experiment=spec.name, description=spec.description, config_file=str(spec.path) if spec.path else None,
        cell=cell.id, method=cell.method, method_index=cell.method_index, method_overrides=cell.overrides,
        setting=cell.setting, tasks=spec.tasks, train_tasks=cell.train_tasks, eval_tasks=cell.eval_tasks,
        seed=cell.seed, sweep=cell.sweep, sweep_index=cell.sweep_index, fingerprint=cell.fingerprint,
        train_config=cell.config.to_dict(), trainable_parameters=params, train=trained,
        eval=EvalSummary(
            protocols=list(spec.eval.protocols), prompt=config.data.prompt, limit=spec.eval.limit,
            batch_size=spec.eval.batch_size, max_new_tokens=spec.eval.max_new_tokens,
            num_beams=spec.eval.num_beams, splits={t: spec.eval.split_of(t) for t in cell.eval_tasks},
        ),
        metrics=metrics, hardware=hardware(config.device),
        wall_seconds=WallSeconds(load=round(load_s, 3), train=round(train_s, 3), eval=round(eval_s, 3),
                                 total=round(time.perf_counter() - start, 3)),
        records_file=records_path(spec.result_path(cell)).name,  # per-record results (paired tables)
        work_dir=str(cell.work_dir), finished_at=_now(),
    )  # fmt: skip
    _write(spec, cell, result, records, predictions)
    return result


def _evaluate(spec, cell: Cell, model, tokenizer, records, prompt: str, progress: bool):
    """``(task -> protocol -> Score, every prediction)`` of the cell's test sets."""

    metrics: dict[str, dict[str, Score]] = {}
    predictions = []
    for task in cell.eval_tasks:
        for protocol in spec.eval.protocols:
            m, preds = evaluate(
                model, tokenizer, task, records[task], protocol, spec.eval.batch_size,
                progress=progress, prompt=prompt, **spec.eval.generation_options(protocol),
            )  # fmt: skip
            metrics.setdefault(task, {})[protocol] = Score.from_dict(m)
            predictions.extend(preds)
    return metrics, predictions


def _training_summary(work_dir: Path, trained_now: bool) -> tuple[int, TrainSummary]:
    """``(trainable parameters, TrainSummary)`` from the trainer's files in ``work_dir``."""

    summary = json.loads((work_dir / RESULTS_FILE).read_text(encoding="utf-8"))
    rows = read_metrics(work_dir / JSONL)
    return summary["trainable_parameters"], TrainSummary(
        steps=summary["steps"], num_examples=summary["num_examples"], num_truncated=summary["num_truncated"],
        first_loss=rows[0]["loss"] if rows else None,
        final_loss=rows[-1]["loss"] if rows else summary.get("final_loss"),
        wall_seconds=summary["elapsed_s"], resumed_from=summary.get("resumed_from"),
        trained_in_this_call=trained_now,
    )  # fmt: skip


def _write(spec: ExperimentSpec, cell: Cell, result: CellResult, records, predictions: list[dict]) -> None:
    """The predictions file, the records file, then the result JSON."""
    atomic_write_text(
        cell.work_dir / PREDICTIONS, "".join(json_text(p, ensure_ascii=False) + "\n" for p in predictions)
    )
    payload = records_payload(cell.id, {t: records[t] for t in cell.eval_tasks}, predictions)
    write_records(records_path(spec.result_path(cell)), payload)
    text = json_text(result.to_dict(), indent=2, ensure_ascii=False) + "\n"
    atomic_write_text(spec.result_path(cell), text)  # last: the result marks the cell done


def hardware(device: str = "auto") -> dict:
    """Where a cell ran: device name, CPU threads, library versions."""

    dev = _device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    return {"device": str(dev), "device_name": name, "cpu_threads": torch.get_num_threads(), **versions()}


def cpu_name() -> str:
    """The processor's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _eval_records(spec: ExperimentSpec, cells: list[Cell]) -> dict[str, list[dict]]:
    tasks = dict.fromkeys(t for c in cells for t in c.eval_tasks)
    records = {t: load_task(t, spec.eval.split_of(t), limit=spec.eval.limit) for t in tasks}
    for task, prompt in dict.fromkeys((t, c.config.data.prompt) for c in cells for t in c.eval_tasks):
        render_many(records[task], task, prompt)  # a record the format cannot word fails before training
    return records


def _with_progress(config: TrainConfig, progress: bool) -> TrainConfig:
    if progress or not config.logging.progress:
        return config

    config = copy.deepcopy(config)
    config.logging.progress = False
    return config


def _metrics_line(result: CellResult) -> str:
    parts = []
    for task, by_protocol in result.metrics.items():
        scores = " ".join(f"{p} {m.accuracy:.3f}" for p, m in by_protocol.items())
        parts.append(f"{task} {scores}")
    return "; ".join(parts)


def _summary_line(result: CellResult) -> str:
    train = result.train
    loss = f"{train.final_loss:.4f}" if train.final_loss is not None else "n/a"
    how = "trained" if train.trained_in_this_call else "reused the trained adapter,"
    if train.trained_in_this_call and train.resumed_from:
        how = f"resumed from {Path(train.resumed_from).name},"
    seconds = result.wall_seconds
    return (
        f"{how} {train.steps} steps (loss {loss}), {result.trainable_parameters:,d} params; "
        f"{_metrics_line(result)}; train {seconds.train:.1f} s, eval {seconds.eval:.1f} s"
    )
