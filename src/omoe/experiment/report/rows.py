"""What every table shares: mean ± std over seeds, the grouping of cells into rows, captions, CSV
rows, and the :class:`Table` a builder returns."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from omoe.experiment.results import CellResult

SWEEP_X = ("adapter.num_experts", "adapter.top_k")  # Fig. 4's x axis, the first one swept


@dataclass
class Table:
    name: str  # table1, table2, ...
    markdown: str
    csv_rows: list[dict]
    figure: object = None  # a matplotlib Figure (fig4)


# ---------------------------------------------------------------------------- statistics
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_mean_std(values: list[float], expected_seeds: int | None = None) -> str:
    """Percent with one decimal: ``55.0 ± 2.1``; one value: ``55.0 ±0.0 (1 seed)``; '–' if none."""
    if not values:
        return "–"
    mean, std = mean_std([100 * v for v in values])
    if len(values) == 1:
        return f"{mean:.1f} ±0.0 (1 seed)"
    text = f"{mean:.1f} ± {std:.1f}"
    if expected_seeds is not None and len(values) != expected_seeds:
        text += f" ({len(values)} seeds)"
    return text


# ---------------------------------------------------------------------------- grouping
@dataclass
class Row:
    """One table row: accuracies per task and seed, parameter counts, test-set sizes."""

    order: tuple
    label: str
    acc: dict[str, dict[int, float]] = field(default_factory=dict)  # task -> seed -> accuracy
    params: set[int] = field(default_factory=set)
    n: dict[str, set[int]] = field(default_factory=dict)

    def values(self, task: str) -> list[float]:
        return list(self.acc.get(task, {}).values())

    def avg_values(self, tasks: list[str]) -> list[float]:
        """Per seed, the mean over ``tasks``, for the seeds that have every task."""
        seeds = set.intersection(*(set(self.acc.get(t, {})) for t in tasks)) if tasks else set()
        return [statistics.fmean(self.acc[t][s] for t in tasks) for s in sorted(seeds)]

    def params_text(self) -> str:
        if not self.params:
            return "–"
        lo, hi = min(self.params), max(self.params)
        return f"{lo:,d}" if lo == hi else f"{lo:,d}–{hi:,d}"


RowOf = Callable[[CellResult], tuple[tuple, str]]  # a cell -> (sort key, row label)


def group(cells: list[CellResult], setting: str, protocol: str, row_of: RowOf):
    """Rows (sorted) and tasks (in order of appearance) of the cells of one setting and protocol."""
    rows: dict[str, Row] = {}
    tasks: list[str] = []  # the experiment's task order, then any other test sets
    seen: set[str] = set()
    for c in cells:
        tasks += [t for t in c.tasks if t not in tasks]
    for c in cells:
        if c.setting != setting:
            continue
        order, label = row_of(c)
        row = rows.setdefault(label, Row(order, label))
        row.params.add(c.trainable_parameters)
        for task in c.eval_tasks:
            m = c.metrics.get(task, {}).get(protocol)
            if m is None:
                continue
            if task not in tasks:
                tasks.append(task)
            seen.add(task)
            row.acc.setdefault(task, {})[c.seed] = m.accuracy
            row.n.setdefault(task, set()).add(m.n)
    return sorted(rows.values(), key=lambda r: r.order), [t for t in tasks if t in seen]


def method_row(cells: list[CellResult]) -> RowOf:
    """Rows = methods, with the values of any key swept in these cells."""
    keys = dict.fromkeys(k for c in cells for k in c.sweep)
    varying = [k for k in keys if len({repr(c.sweep.get(k)) for c in cells}) > 1]

    def row_of(c: CellResult) -> tuple[tuple, str]:
        label = c.method
        if varying:
            label += " (" + ", ".join(f"{short(k)}={c.sweep.get(k)}" for k in varying) + ")"
        return (c.method_index, c.sweep_index), label

    return row_of


# ---------------------------------------------------------------------------- captions and CSV
def experiments(cells: list[CellResult]) -> str:
    """The experiments' names, in order of appearance."""
    return ", ".join(dict.fromkeys(c.experiment for c in cells))


def caption(cells: list[CellResult], tasks: list[str], seeds: int, rows: list[Row]) -> str:
    n = ", ".join(f"{t} {join(set().union(*(r.n.get(t, set()) for r in rows)))}" for t in tasks)
    models = join({c.train_config["model"] for c in cells})
    return (
        f"Experiment {experiments(cells)}; model {models}; mean ± sample std (n−1) over {seeds} seed(s); "
        f"test records per task: {n}."
    )


def csv_row(row: Row, tasks: list[str], **extra) -> dict:
    out = {**extra, "row": row.label, "trainable_parameters": row.params_text().replace(",", "")}
    for t, values in [*((t, row.values(t)) for t in tasks), ("avg", row.avg_values(tasks))]:
        if values:
            mean, std = mean_std([100 * v for v in values])
            out.update({f"{t}_mean": round(mean, 4), f"{t}_std": round(std, 4), f"{t}_seeds": len(values)})
        else:
            out.update({f"{t}_mean": None, f"{t}_std": None, f"{t}_seeds": 0})
    return out


# ---------------------------------------------------------------------------- small helpers
def protocols(cells: list[CellResult]) -> list[str]:
    return list(dict.fromkeys(p for c in cells for p in c.eval.protocols))


def seed_count(rows: list[Row]) -> int:
    return len({s for r in rows for by_seed in r.acc.values() for s in by_seed})


def swept(cells: list[CellResult], key: str) -> bool:
    return any(key in c.sweep for c in cells) and len({c.config_value(key) for c in cells}) > 1


def short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def join(values: set) -> str:
    return "/".join(str(v) for v in sorted(values, key=sort_key))


def sort_key(value) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))
