"""The paired table: a reference row minus each other row on the same test records, per-record
results pooled over the seeds both have, with a 95% paired bootstrap interval over the records
(accuracy, and the gold label's log-probability for the ``label`` protocol)."""

from __future__ import annotations

import statistics
import zlib
from dataclasses import dataclass, field

import numpy as np

from omoe.errors import ConfigError
from omoe.experiment import stats
from omoe.experiment.report.loading import Results
from omoe.experiment.report.records import (
    ByRow,
    check_same_records,
    has_logprob,
    record_sections,
    reference_row,
)
from omoe.experiment.report.rows import Table, experiments
from omoe.experiment.results import CellResult
from omoe.experiment.stats import Estimate

_QUANTITIES = (  # (Records field, row text, scale, format)
    ("correct", "Δ accuracy (points)", 100.0, "+.1f"),
    ("gold_logprob", "Δ log p(gold) (nats)", 1.0, "+.3f"),
)


def paired(results: Results, reference: str | None = None) -> Table:
    """The reference row minus each other row, per task and averaged over tasks, on the same test
    records: per record, the reference's result minus the other's in the same seed, averaged over
    the seeds both have; the mean over the records with a 95% percentile bootstrap interval
    (:mod:`omoe.experiment.stats`; records resampled, within each task for the average)."""
    cells = results.cells
    ref = reference_row(cells, reference)
    if ref is None:
        raise ConfigError("paired: no OMoE method in these results; name the reference row with --reference")
    check_same_records(results)
    parts, csv_rows = [], []
    for protocol, setting, rows, tasks, data in record_sections(results):
        others = [r.label for r in rows if r.label != ref]
        if ref not in data or not any(label in data for label in others):
            continue
        md, rows_csv = _paired_section(cells, data, ref, others, tasks, setting, protocol)
        parts.append(md)
        csv_rows += rows_csv
    return Table("paired", "\n\n".join(parts), csv_rows)


@dataclass
class _Differences:
    """Per-record differences (reference minus row) of one section, per task."""

    # (row, quantity) -> task -> the mean difference, and its (resamples,) bootstrap means
    means: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    boots: dict[tuple[str, str], dict[str, np.ndarray]] = field(default_factory=dict)
    common: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # row -> task -> the seeds pooled
    n_records: dict[str, int] = field(default_factory=dict)


def _differences(data: ByRow, ref: str, others: list[str], tasks: list[str], quantities) -> _Differences:
    out = _Differences()
    for task in tasks:
        ref_seeds = data[ref].get(task, {})
        columns, keys = [], []
        for other in others:
            seeds = sorted(set(ref_seeds) & set(data.get(other, {}).get(task, {})))
            if not seeds:
                continue
            out.common.setdefault(other, {})[task] = seeds
            pairs = [(ref_seeds[s], data[other][task][s]) for s in seeds]
            for field_name, *_ in quantities:
                a = [getattr(x, field_name) for x, _ in pairs]
                b = [getattr(y, field_name) for _, y in pairs]
                if any(v is None for v in a + b):
                    continue
                columns.append(np.mean([x - y for x, y in zip(a, b)], axis=0))  # (n,): mean over seeds
                keys.append((other, field_name))
        if not columns:
            continue
        values = np.stack(columns, axis=1)  # (n records, columns)
        out.n_records[task] = len(values)
        # one generator per task (seeded by its name): the same resamples in every table and column
        drawn = stats.bootstrap_means(values, stats.RESAMPLES, (stats.SEED, zlib.crc32(task.encode())))
        for j, key in enumerate(keys):
            out.means.setdefault(key, {})[task] = float(values[:, j].mean())
            out.boots.setdefault(key, {})[task] = drawn[:, j]
    return out


def _paired_header(cells: list[CellResult], ref: str, tasks, setting, protocol, logprob: bool, n_records):
    return [
        f"### Paired differences, {setting}-task, protocol `{protocol}`: {ref} minus each method, same test records",
        "",
        f"Experiment {experiments(cells)}. Per test record, {ref}'s result minus the method's in the same seed, averaged over "
        f"the seeds both have (`seeds`); each cell is the mean over the records and its 95% percentile bootstrap "
        f"interval [low, high] ({stats.RESAMPLES:,d} resamples of the records with replacement, seeded: the same "
        "output every run). Δ accuracy is in percentage points"
        + (
            "; Δ log p(gold) in nats, log p(gold) being log_softmax over the task's label logits at the gold label"
            if logprob
            else ""
        )
        + ". Avg: the mean over the tasks, records "
        "resampled within each task. The interval covers the sampling of test records only, not the "
        "training noise between seeds (see the mean ± std tables). n/a: no per-record results for those cells "
        "(results written before they were kept). Test records per task: "
        + ", ".join(f"{t} {n}" for t, n in n_records.items())
        + ".",
        "",
        "| method | seeds | Δ | " + " | ".join(tasks) + " | Avg |",
        "|---|---|---|" + "---:|" * (len(tasks) + 1),
    ]


def _paired_section(cells, data, ref, others, tasks, setting, protocol) -> tuple[str, list[dict]]:
    quantities = [q for q in _QUANTITIES if q[0] == "correct" or has_logprob(data)]
    d = _differences(data, ref, others, tasks, quantities)
    lines = _paired_header(cells, ref, tasks, setting, protocol, len(quantities) > 1, d.n_records)
    csv_rows = []
    ref_seeds = set().union(*(data[ref].get(t, {}) for t in tasks))
    for other in others:
        pooled = sorted(set().union(*d.common.get(other, {}).values()))
        seeds_text = ", ".join(map(str, pooled)) or "–"
        other_seeds = set().union(*(data.get(other, {}).get(t, {}) for t in tasks))
        if pooled and ref_seeds != other_seeds:
            seeds_text += f" (common; {ref} has {len(ref_seeds)}, {other} {len(other_seeds)})"
        for field_name, text, scale, spec in quantities:
            key = (other, field_name)
            by_task = d.means.get(key, {})
            cols = []
            for t in tasks:
                if t not in by_task:
                    cols.append("n/a")
                    continue
                est = stats.estimates(by_task[t], d.boots[key][t][:, None])[0]
                seeds = d.common[other][t]
                note = "" if seeds == pooled else f" (seeds {', '.join(map(str, seeds))})"
                cols.append(_interval(est, scale, spec) + note)
                csv_rows.append(_paired_csv(protocol, setting, ref, other, field_name, t, seeds,
                                            d.n_records[t], est, scale))  # fmt: skip
            if by_task and len(by_task) == len(tasks):
                avg = statistics.fmean(by_task[t] for t in tasks)
                est = stats.estimates(avg, np.mean([d.boots[key][t] for t in tasks], axis=0)[:, None])[0]
                cols.append(_interval(est, scale, spec))
                csv_rows.append(_paired_csv(protocol, setting, ref, other, field_name, "avg", pooled,
                                            sum(d.n_records[t] for t in tasks), est, scale))  # fmt: skip
            else:
                cols.append("n/a" if not by_task else "–")
            lines.append(f"| {other} | {seeds_text} | {text} | " + " | ".join(cols) + " |")
    return "\n".join(lines), csv_rows


def _interval(est: Estimate, scale: float, spec: str) -> str:
    return f"{format(scale * est.mean, spec)} [{format(scale * est.low, spec)}, {format(scale * est.high, spec)}]"


def _paired_csv(protocol, setting, ref, other, quantity, task, seeds, n, est: Estimate, scale) -> dict:
    return {"protocol": protocol, "setting": setting, "reference": ref, "row": other,
            "quantity": "accuracy_points" if quantity == "correct" else "gold_logprob_nats", "task": task,
            "seeds": " ".join(map(str, seeds)), "records": n, "diff": round(scale * est.mean, 6),
            "ci_low": round(scale * est.low, 6), "ci_high": round(scale * est.high, 6)}  # fmt: skip
