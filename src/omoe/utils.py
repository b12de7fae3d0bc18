"""Small helpers shared by the CLI commands."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from omoe.errors import NonFiniteError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Let ``write(tmp_path)`` fill a temporary file beside ``path``, then rename it into place:
    ``path`` is never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make results unreadable to others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never a partial file."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def json_text(obj, **kwargs) -> str:
    """``json.dumps(obj, **kwargs)`` as strict JSON: a NaN or infinity is a :class:`NonFiniteError`
    naming where it sits (``tasks.boolq.accuracy is nan``), never a bare ``NaN`` token that strict
    readers reject."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:
        where = _non_finite_path(obj)
        if where is None:
            raise
        path, value = where
        raise NonFiniteError(f"{path or 'the value'} is {value}; strict JSON cannot hold it") from None


def _non_finite_path(obj, path: str = "") -> tuple[str, float] | None:
    """``(dotted path, value)`` of the first NaN/inf float inside ``obj``, or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (path, obj)
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        found = _non_finite_path(value, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def atomic_save_figure(figure, path: str | os.PathLike, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG through a temporary file and a rename."""
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format="png"), suffix=".png")


def quiet_transformers() -> None:
    """Hide transformers' own progress bars (weight loading) for commands run with --no-progress."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def flatten(data: dict, prefix: str = "") -> dict:
    """Nested mappings to ``{dotted key: value}`` (values that are lists stay whole)."""
    flat = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat
