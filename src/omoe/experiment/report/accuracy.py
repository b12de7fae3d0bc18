"""The accuracy tables: 1 (single-task), 2 (single vs multi-task), 4 (layer-wise OMoE, the paper's
Tables 4-5) and 10 (rank); mean ± sample std over seeds, in percent."""

from __future__ import annotations

import statistics

from omoe.experiment.report.loading import Results
from omoe.experiment.report.rows import (
    Row,
    RowOf,
    Table,
    caption,
    csv_row,
    format_mean_std,
    group,
    method_row,
    protocols,
    seed_count,
)
from omoe.experiment.results import CellResult


def table1(results: Results) -> Table:
    cells = results.cells
    parts, csv_rows = [], []
    for protocol in protocols(cells):
        rows, tasks = group(cells, "single", protocol, method_row(cells))
        header = f"### Table 1: single-task accuracy (%), protocol `{protocol}`"
        md, rows_csv = _accuracy_table(header, cells, rows, tasks, "method", protocol, "single")
        parts.append(md)
        csv_rows += rows_csv
    return Table("table1", "\n\n".join(parts), csv_rows)


def table2(results: Results) -> Table:
    cells = results.cells
    parts, csv_rows = [], []
    for protocol in protocols(cells):
        row_of = method_row(cells)
        single, t1 = group(cells, "single", protocol, row_of)
        multi, t2 = group(cells, "multi", protocol, row_of)
        tasks = t1 + [t for t in t2 if t not in t1]
        seeds = seed_count(single + multi)
        by_setting = {"single": {r.label: r for r in single}, "multi": {r.label: r for r in multi}}
        labels = [r.label for r in sorted(single + multi, key=lambda r: r.order)]
        lines = [
            f"### Table 2: single-task vs multi-task accuracy (%), protocol `{protocol}`",
            "",
            caption(cells, tasks, seeds, single + multi),
            "",
            "| method | setting | #params | " + " | ".join(tasks) + " | Avg |",
            "|---|---|---:|" + "---:|" * (len(tasks) + 1),
        ]
        for label in dict.fromkeys(labels):
            pair = {k: rows.get(label) for k, rows in by_setting.items()}
            for setting, row in pair.items():
                if row is None:
                    continue
                cols = [format_mean_std(row.values(t), seeds) for t in tasks]
                cols.append(format_mean_std(row.avg_values(tasks), seeds))
                lines.append(f"| {label} | {setting} | {row.params_text()} | " + " | ".join(cols) + " |")
                csv_rows.append(csv_row(row, tasks, protocol=protocol, setting=setting))
            s, m = pair["single"], pair["multi"]
            if s is not None and m is not None:
                deltas = [_delta(s.values(t), m.values(t)) for t in tasks]
                deltas.append(_delta(s.avg_values(tasks), m.avg_values(tasks)))
                lines.append(f"| {label} | Δ multi − single | | " + " | ".join(deltas) + " |")
                csv_rows.append(
                    {"protocol": protocol, "setting": "delta", "row": label,
                     **{f"{t}_mean": d for t, d in zip([*tasks, "avg"], deltas)}}
                )  # fmt: skip
        parts.append("\n".join(lines))
    return Table("table2", "\n\n".join(parts), csv_rows)


def table4(results: Results) -> Table:
    cells = [c for c in results.cells if c.adapter("method") == "omoe"]
    methods = {c.method for c in cells}

    def row_of(c: CellResult) -> tuple[tuple, str]:
        layers = c.adapter("orthogonal_layers")
        label = str(layers) if len(methods) == 1 else f"{c.method}: {layers}"
        return (c.method_index, c.sweep_index), label

    return _per_setting("table4", "Tables 4-5: layer-wise OMoE", "orthogonal_layers", cells, row_of)


def table10(results: Results) -> Table:
    cells = results.cells

    def row_of(c: CellResult) -> tuple[tuple, str]:
        return (c.method_index, c.adapter("r")), f"{c.method} r={c.adapter('r')}"

    return _per_setting("table10", "Table 10: LoRA rank", "method, rank", cells, row_of)


def _per_setting(name: str, title: str, row_header: str, cells: list[CellResult], row_of: RowOf) -> Table:
    parts, csv_rows = [], []
    for protocol in protocols(cells):
        for setting in ("single", "multi"):
            rows, tasks = group(cells, setting, protocol, row_of)
            if not rows:
                continue
            header = f"### {title}, {setting}-task accuracy (%), protocol `{protocol}`"
            md, rows_csv = _accuracy_table(header, cells, rows, tasks, row_header, protocol, setting)
            parts.append(md)
            csv_rows += rows_csv
    return Table(name, "\n\n".join(parts), csv_rows)


def _accuracy_table(
    header: str, cells: list[CellResult], rows: list[Row], tasks: list[str], row_header: str, protocol: str,
    setting: str,
) -> tuple[str, list[dict]]:  # fmt: skip
    seeds = seed_count(rows)
    lines = [
        header,
        "",
        caption(cells, tasks, seeds, rows),
        "",
        f"| {row_header} | #params | " + " | ".join(tasks) + " | Avg |",
        "|---|---:|" + "---:|" * (len(tasks) + 1),
    ]
    csv_rows = []
    for row in rows:
        cols = [format_mean_std(row.values(t), seeds) for t in tasks]
        cols.append(format_mean_std(row.avg_values(tasks), seeds))
        lines.append(f"| {row.label} | {row.params_text()} | " + " | ".join(cols) + " |")
        csv_rows.append(csv_row(row, tasks, protocol=protocol, setting=setting))
    return "\n".join(lines), csv_rows


def _delta(single: list[float], multi: list[float]) -> str:
    if not single or not multi:
        return "–"
    return f"{100 * (statistics.fmean(multi) - statistics.fmean(single)):+.1f}"
