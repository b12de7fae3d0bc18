"""The answer spread: per row and task, the share of test records given the most frequent
prediction, beside the share of the most frequent gold answer (100% is a constant answer, whose
accuracy is only the label balance)."""

from __future__ import annotations

import statistics

from omoe.eval.evaluate import answer_counts as count
from omoe.experiment.report.loading import Results, read_predictions
from omoe.experiment.report.rows import Table, method_row, protocols
from omoe.experiment.results import CellResult


def answer_counts(cell: CellResult) -> dict[tuple[str, str], tuple[dict, dict]]:
    """(task, protocol) -> (prediction counts, gold answer counts) of one cell: from its metrics
    (results written since the counts were added), else from ``eval_predictions.jsonl`` in its work
    dir when that is still on disk; {} when neither is there."""
    out = {}
    for task, by_protocol in cell.metrics.items():
        for protocol, m in by_protocol.items():
            if m.prediction_counts is not None and m.answer_counts is not None:
                out[(task, protocol)] = (m.prediction_counts, m.answer_counts)
    if out:
        return out
    predictions = read_predictions(cell)
    if predictions is None:
        return {}
    by_key: dict[tuple[str, str], list[dict]] = {}
    for p in predictions:
        by_key.setdefault((p["task"], p["protocol"]), []).append(p)
    return {
        k: (c["prediction_counts"], c["answer_counts"]) for k, c in ((k, count(v)) for k, v in by_key.items())
    }


def answers(results: Results) -> Table:
    """Share (%) of test records given the most frequent prediction, per row and task (mean over
    seeds), with the answer most often top over the seeds named (a tie: the first cell's, in file
    order); a last row gives the gold answers' majority share."""
    counted = [(c, counts) for c in results.cells if (counts := answer_counts(c))]  # read each file once
    cells = [c for c, _ in counted]
    row_of = method_row(cells)
    tasks = list(dict.fromkeys(t for c in cells for t in c.eval_tasks))
    parts, csv_rows = [], []
    for protocol in protocols(cells):
        rows: dict[tuple, dict] = {}  # (order, setting, label) -> task -> [(top answer, share)]
        gold: dict[str, tuple[str, float]] = {}
        for c, counts in counted:
            order, label = row_of(c)
            row = rows.setdefault((order, c.setting, label), {})
            for (task, proto), (predicted, truth) in counts.items():
                if proto != protocol:
                    continue
                n = sum(truth.values())
                if predicted:
                    top = max(predicted.items(), key=lambda kv: kv[1])
                    row.setdefault(task, []).append((top[0], top[1] / n))
                else:  # every answer was a no-match
                    row.setdefault(task, []).append(("(no match)", 0.0))
                g = max(truth.items(), key=lambda kv: kv[1])
                gold[task] = (g[0], g[1] / n)
        used = [t for t in tasks if t in gold]
        md, rows_csv = _spread_section(protocol, rows, gold, used)
        parts.append(md)
        csv_rows += rows_csv
    return Table("answers", "\n\n".join(parts), csv_rows)


def _spread_section(protocol: str, rows: dict, gold: dict, used: list[str]) -> tuple[str, list[dict]]:
    lines = [
        f"### Answer spread, protocol `{protocol}`: share (%) of test records given the most frequent prediction",
        "",
        "Mean over seeds, with the answer that was most often the top one. 100 means the same answer to every "
        "question; the `gold majority` row is the share of the most frequent correct answer, which is what such "
        "a constant answer scores at best. Cells without answer counts (and without their predictions file) "
        "are left out.",
        "",
        "| method | setting | " + " | ".join(used) + " |",
        "|---|---|" + "---:|" * len(used),
    ]
    csv_rows = []
    for (_, setting, label), by_task in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        cols, csv_row = [], {"protocol": protocol, "setting": setting, "row": label}
        for t in used:
            if t not in by_task:
                cols.append("–")
                continue
            share = statistics.fmean(v for _, v in by_task[t])
            tops = [a for a, _ in by_task[t]]  # one per seed, in file order
            top = max(dict.fromkeys(tops), key=tops.count)  # a tie: the first seed's (a set's order varied)
            cols.append(f"{100 * share:.1f} `{top}`")
            csv_row.update({f"{t}_top_share": round(100 * share, 4), f"{t}_top": top,
                            f"{t}_seeds": len(by_task[t])})  # fmt: skip
        lines.append(f"| {label} | {setting} | " + " | ".join(cols) + " |")
        csv_rows.append(csv_row)
    lines.append(
        "| gold majority | | " + " | ".join(f"{100 * gold[t][1]:.1f} `{gold[t][0]}`" for t in used) + " |"
    )
    csv_rows.append({"protocol": protocol, "setting": "", "row": "gold majority",
                     **{f"{t}_top_share": round(100 * gold[t][1], 4) for t in used},
                     **{f"{t}_top": gold[t][0] for t in used}})  # fmt: skip
    return "\n".join(lines), csv_rows
