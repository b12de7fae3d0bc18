"""Per-record results grouped as the paired and log-probability tables read them, and the paired
table's reference row."""

from __future__ import annotations

from collections.abc import Iterator

from omoe.errors import ConfigError
from omoe.experiment.report.loading import Results, cell_records
from omoe.experiment.report.rows import Row, RowOf, group, method_row, protocols
from omoe.experiment.results import CellResult
from omoe.experiment.stats import Records

ByRow = dict[str, dict[str, dict[int, Records]]]  # row label -> task -> seed -> Records


def reference_row(cells: list[CellResult], reference: str | None = None) -> str | None:
    """The paired table's reference row: ``reference`` as a row label or a method name, by default
    the first row (in the experiment's order) whose adapter is OMoE; None if there is none."""
    row_of = method_row(cells)
    rows: dict[str, tuple] = {}  # label -> (order, method name, adapter method)
    for c in cells:
        order, label = row_of(c)
        rows.setdefault(label, (order, c.method, c.adapter("method")))
    labels = sorted(rows, key=lambda label: rows[label][0])
    if reference is None:
        return next((label for label in labels if rows[label][2] == "omoe"), None)
    if reference in rows:
        return reference
    matches = [label for label in labels if rows[label][1] == reference]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(
            f"--reference {reference} names several rows ({'; '.join(matches)}); give one of them"
        )
    raise ConfigError(
        f"--reference {reference} is not a method or row of these results; rows: {'; '.join(labels)}"
    )


def paired_possible(results: Results, reference: str | None) -> bool:
    ref = reference_row(results.cells, reference)
    if ref is None:
        return False
    row_of = method_row(results.cells)
    have = {(c.setting, row_of(c)[1]) for c in results.cells if cell_records(results, c)}
    return any((setting, ref) in have for setting, label in have if label != ref)


def record_sections(results: Results) -> Iterator[tuple[str, str, list[Row], list[str], ByRow]]:
    """``(protocol, setting, rows, tasks, row -> task -> seed -> Records)`` per protocol and setting."""
    row_of = method_row(results.cells)
    for protocol in protocols(results.cells):
        for setting in ("single", "multi"):
            rows, tasks = group(results.cells, setting, protocol, row_of)
            yield protocol, setting, rows, tasks, _per_record(results, setting, protocol, row_of)


def _per_record(results: Results, setting: str, protocol: str, row_of: RowOf) -> ByRow:
    """Row label -> task -> seed -> Records of the cells of one setting and protocol."""
    out: ByRow = {}
    for c in results.cells:
        if c.setting != setting:
            continue
        label = row_of(c)[1]
        for (task, proto), r in cell_records(results, c).items():
            if proto == protocol and task in c.eval_tasks:
                out.setdefault(label, {}).setdefault(task, {})[c.seed] = r
    return out


def check_same_records(results: Results) -> None:
    """Every cell that has per-record results of a task has them for the same records."""
    first: dict[str, tuple[str, Records]] = {}
    for c in results.cells:
        for (task, _), r in cell_records(results, c).items():
            name, r0 = first.setdefault(task, (c.cell, r))
            if not r0.same_records(r):
                n0, n1 = len(r0.index), len(r.index)
                what = f"{n0} vs {n1} records" if n0 != n1 else "as many records, but not the same ones"
                raise ConfigError(
                    f"paired: cells {name} and {c.cell} do not cover the same {task} test records ({what}); "
                    "a paired comparison needs the same records in every cell (same eval split and limit)"
                )


def has_logprob(data: ByRow) -> bool:
    return any(
        r.gold_logprob is not None
        for by_task in data.values()
        for by_seed in by_task.values()
        for r in by_seed.values()
    )
