"""Read LLM-Adapters-format JSON files (bundled or user-supplied) and mix tasks for multi-task training.

A file is a JSON list of records ``{"instruction": str, "input": str, "output": str, "answer": str}``,
stored as ``.json`` or ``.json.gz``. Every record is validated on load; errors name the file, the
record index and the problem.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

from omoe.data.tasks import VAL_SPLIT, Task, get_task, val_indices
from omoe.errors import ConfigError, OMoEError
from omoe.options import check_int

RECORD_FIELDS: tuple[str, ...] = ("instruction", "input", "output", "answer")
DATA_DIR = Path(__file__).resolve().parent / "commonsense"


class DataFormatError(OMoEError, ValueError):
    """A data file is not a JSON list of well-formed records."""


def load_records(path: str | Path, task: str | Task | None = None) -> list[dict]:
    """Read and validate a ``.json`` or ``.json.gz`` file of records.

    Args:
        path: the file.
        task: if given, every record's ``answer`` must be one of the task's labels.

    Returns:
        The records as dicts (extra keys are kept).
    """
    path = Path(path)
    task = get_task(task) if task is not None else None
    if not path.name.endswith((".json", ".json.gz")):
        raise ConfigError(f"data file {path} must end in .json or .json.gz")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise DataFormatError(
            f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from None
    except (OSError, UnicodeDecodeError) as err:  # bad gzip stream, bad encoding
        raise DataFormatError(f"{path}: cannot read: {err}") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of records, got a {type(data).__name__}")
    for i, record in enumerate(data):
        problem = _record_problem(record, task)
        if problem:
            raise DataFormatError(f"{path}: record {i}: {problem}")
    return data


def _record_problem(record: object, task: Task | None) -> str | None:
    if not isinstance(record, dict):
        return f"expected an object with fields {', '.join(RECORD_FIELDS)}, got a {type(record).__name__}"
    for key in RECORD_FIELDS:
        if key not in record:
            return f"missing field {key!r} (each record needs {', '.join(RECORD_FIELDS)})"
        if not isinstance(record[key], str):
            return f"field {key!r} must be a string, got {type(record[key]).__name__}"
    if task is not None and record["answer"] not in task.labels:
        return f"answer {record['answer']!r} is not a {task.name} label ({'/'.join(task.labels)})"
    return None


def bundled_file(task: str | Task, split: str) -> Path:
    """Path of the bundled file a split is read from, e.g. ``bundled_file("boolq", "train")``
    (``val`` and ``train+val`` are read from the train file)."""
    task = get_task(task)
    if split not in task.splits:
        raise ConfigError(
            f"task {task.name} has no bundled split {split!r}; bundled: {', '.join(task.splits)} "
            "(pass a data file for other splits)"
        )
    return DATA_DIR / task.name / f"{split if split in task.files else 'train'}.json.gz"


def load_split(task: str | Task, split: str) -> list[dict]:
    """All records of a bundled split, in file order. ``val`` is the slice
    :func:`omoe.data.tasks.val_indices` of the train file, ``train`` the rest of it less any record
    whose instruction is also a ``val`` record's (the official train sets hold a few exact
    duplicates), and ``train+val`` the whole file."""
    task = get_task(task)
    records = load_records(bundled_file(task, split), task)
    if split not in ("train", VAL_SPLIT):
        return records  # a file of its own, or train+val (the whole train file)
    picked = set(val_indices(len(records)))
    val = [r for i, r in enumerate(records) if i in picked]
    if split == VAL_SPLIT:
        return val
    seen = {r["instruction"] for r in val}
    return [r for i, r in enumerate(records) if i not in picked and r["instruction"] not in seen]


def load_task(
    task: str | Task, split: str | None = None, data_file: str | Path | None = None, limit: int | None = None
) -> list[dict]:
    """Records of one task: a bundled split (default: the task's ``eval_split``; see
    :func:`load_split`) or ``data_file``.

    ``limit`` keeps the first ``limit`` records, in file order (as LLM-Adapters evaluates them).
    """
    task = get_task(task)
    check_int("limit", limit, 1, nullable=True)
    if data_file is not None:
        records = load_records(data_file, task)
    else:
        records = load_split(task, split or task.eval_split)
    return records[:limit] if limit is not None else records


def mix_tasks(
    tasks: list[str | Task], split: str, seed: int, limit_per_task: int | None = None
) -> list[dict]:
    """Concatenate several tasks' bundled ``split`` and shuffle them with ``seed``.

    Each returned record is a copy with an extra key ``"task"``. With ``limit_per_task``, each task
    contributes a seeded random subset of that size (all of it if smaller). The result depends only on
    the arguments, not on global random state.
    """
    check_int("limit_per_task", limit_per_task, 1, nullable=True)
    resolved = [get_task(t) for t in tasks]
    if not resolved:
        raise ConfigError("mix_tasks needs at least one task")
    if len({t.name for t in resolved}) != len(resolved):
        raise ConfigError(f"task listed twice in {[t.name for t in resolved]}; give each task once")
    rng = random.Random(seed)
    mixed: list[dict] = []
    for task in resolved:
        records = [{**r, "task": task.name} for r in load_task(task, split)]
        if limit_per_task is not None and limit_per_task < len(records):
            records = rng.sample(records, limit_per_task)
        mixed.extend(records)
    rng.shuffle(mixed)
    return mixed


