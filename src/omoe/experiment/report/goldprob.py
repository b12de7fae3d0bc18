"""The logprob table: the mean gold-label log-probability (nats, ``label`` protocol) per row and
task, mean ± sample std over seeds, beside a uniform guess."""

from __future__ import annotations

import math
import statistics

from omoe.data.tasks import get_task
from omoe.errors import ConfigError
from omoe.experiment.report.loading import Results
from omoe.experiment.report.records import has_logprob, record_sections
from omoe.experiment.report.rows import Table, caption, mean_std


def logprob(results: Results) -> Table:
    """Mean gold-label log-probability (nats) per row and task: per cell the mean over the test
    records, then mean ± sample std over seeds; Avg per seed over the tasks, then over seeds."""
    cells = results.cells
    parts, csv_rows = [], []
    for protocol, setting, rows, tasks, data in record_sections(results):
        if not has_logprob(data):
            continue
        per_seed = {  # row -> task -> seed -> mean log p(gold)
            label: {t: {s: float(r.gold_logprob.mean()) for s, r in by_seed.items() if r.gold_logprob is not None}
                    for t, by_seed in by_task.items()}
            for label, by_task in data.items()
        }  # fmt: skip
        seeds = len({s for by_task in per_seed.values() for by_seed in by_task.values() for s in by_seed})
        lines = [
            f"### Gold-label log-probability (nats), {setting}-task, protocol `{protocol}`",
            "",
            caption(cells, tasks, seeds, rows)
            + " Per cell, the mean over the test records of log p(gold) = log_softmax over the task's label "
            "logits at the gold label: 0 is certainty, and the `uniform` row is an equal split over the labels. "
            "Higher is better; it moves with the model's confidence where accuracy does not. Avg per seed over "
            "the tasks, then over the seeds that have every task. n/a: no per-record results for those cells.",
            "",
            "| method | #params | " + " | ".join(tasks) + " | Avg |",
            "|---|---:|" + "---:|" * (len(tasks) + 1),
        ]
        for row in rows:
            by_task = per_seed.get(row.label, {})
            values = {t: list(by_task.get(t, {}).values()) for t in tasks}
            common = set.intersection(*(set(by_task.get(t, {})) for t in tasks)) if tasks else set()
            values["avg"] = [statistics.fmean(by_task[t][s] for t in tasks) for s in sorted(common)]
            cols = [_format_logprob(values[t], seeds) for t in [*tasks, "avg"]]
            lines.append(f"| {row.label} | {row.params_text()} | " + " | ".join(cols) + " |")
            out = {"protocol": protocol, "setting": setting, "row": row.label}
            for t, v in values.items():
                mean, std = mean_std(v) if v else (None, None)
                out.update({f"{t}_mean": _round(mean), f"{t}_std": _round(std), f"{t}_seeds": len(v)})
            csv_rows.append(out)
        uniform = [_uniform_logprob(t) for t in tasks]
        lines.append(
            "| uniform | | "
            + " | ".join("–" if u is None else f"{u:.3f}" for u in uniform)
            + (f" | {statistics.fmean(uniform):.3f} |" if None not in uniform else " | – |")
        )
        parts.append("\n".join(lines))
    return Table("logprob", "\n\n".join(parts), csv_rows)


def _format_logprob(values: list[float], expected_seeds: int) -> str:
    if not values:
        return "n/a"
    mean, std = mean_std(values)
    if len(values) == 1:
        return f"{mean:.3f} ±0.000 (1 seed)"
    return f"{mean:.3f} ± {std:.3f}" + (f" ({len(values)} seeds)" if len(values) != expected_seeds else "")


def _uniform_logprob(task: str) -> float | None:
    try:
        return -math.log(len(get_task(task).labels))
    except (ConfigError, KeyError):
        return None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
