"""The runs table: one row per cell with its wall times (load, train, eval) and hardware, then the
totals."""

from __future__ import annotations

from omoe.experiment.report.loading import Results
from omoe.experiment.report.rows import Table, experiments


def runs(results: Results) -> Table:
    """One row per cell: its wall times and hardware, in the experiment's order; then the totals."""
    cells = sorted(results.cells, key=lambda c: (c.seed, c.setting, c.method_index, c.sweep_index, c.cell))
    lines = [
        "### Runs: wall time per cell",
        "",
        f"Experiment {experiments(cells)}; seconds as recorded in each result "
        "(train: over all resumptions of the cell; load: the base model, 0 when an earlier cell of the same "
        "process had loaded it; total = load + train + eval).",
        "",
        "| cell | trainable params | load s | train s | eval s | total s | hardware | finished |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    csv_rows, totals = [], dict.fromkeys(("load", "train", "eval", "total"), 0.0)
    for c in cells:
        ws, hw = c.wall_seconds, c.hardware
        train = c.train.wall_seconds if c.train.wall_seconds is not None else ws.train  # over all resumptions
        w = {"load": ws.load, "train": 0.0 if train is None else train, "eval": ws.eval}  # None: not recorded
        w["total"] = sum(w[k] if w[k] is not None else 0.0 for k in ("load", "train", "eval"))
        where = (
            f"{hw.get('device_name', '?')} ({hw.get('device', '?')}, {hw.get('cpu_threads', '?')} threads)"
        )
        for k in totals:
            totals[k] += w[k] or 0.0
        lines.append(
            f"| {c.cell} | {c.trainable_parameters:,d} | {w['load'] or 0:.0f} | {w['train']:.0f} | "
            f"{w['eval'] or 0:.0f} | {w['total']:.0f} | {where} | {c.finished_at or '–'} |"
        )
        csv_rows.append({"cell": c.cell, "trainable_parameters": c.trainable_parameters,
                         **{f"{k}_s": w[k] for k in totals}, "hardware": where,
                         "finished_at": c.finished_at})  # fmt: skip
    lines.append(
        f"| **{len(cells)} cells** | | {totals['load']:.0f} | {totals['train']:.0f} | {totals['eval']:.0f} | "
        f"{totals['total']:.0f} ({totals['total'] / 3600:.2f} h) | | |"
    )
    return Table("runs", "\n".join(lines), csv_rows)
