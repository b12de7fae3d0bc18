"""Training metrics: one row per logged optimizer step to ``metrics.jsonl`` and ``metrics.csv``, and
to TensorBoard when the ``tensorboard`` package is installed.

Rows are appended as whole lines and flushed. On resume the files are cut back (atomically) to the
rows at or before the checkpoint's step, so they read as one uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from omoe.utils import atomic_write_text, json_text

FIELDS = ("step", "epoch", "loss", "aux_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s")
JSONL = "metrics.jsonl"
CSV = "metrics.csv"


class MetricsLogger:
    """Append-only metrics files in ``output_dir``; ``start_step`` > 0 truncates to it first."""

    def __init__(self, output_dir: str | Path, start_step: int = 0, tensorboard: bool = True):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        rows = (
            [r for r in read_metrics(self.dir / JSONL) if r.get("step", 0) <= start_step]
            if start_step
            else []
        )
        atomic_write_text(self.dir / JSONL, "".join(json_text(r) + "\n" for r in rows))
        atomic_write_text(self.dir / CSV, _csv_text(rows, header=True))
        self._jsonl = open(self.dir / JSONL, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._csv = open(self.dir / CSV, "a", encoding="utf-8", newline="")  # noqa: SIM115
        self.tb = _tensorboard(self.dir / "tensorboard", start_step) if tensorboard else None

    def log(self, row: dict) -> None:
        self._jsonl.write(json_text(row) + "\n")
        self._jsonl.flush()
        self._csv.write(_csv_text([row], header=False))
        self._csv.flush()
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        self._jsonl.close()
        self._csv.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The complete rows of a ``metrics.jsonl`` (a torn last line of a killed run is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _csv_text(rows: list[dict], header: bool) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _tensorboard(log_dir: Path, start_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=start_step or None)
