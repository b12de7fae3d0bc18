"""Fig. 4: mean accuracy against a swept key (default: the number of experts), one line per method
and routing, as a table and a PNG."""

from __future__ import annotations

from omoe.errors import ConfigError
from omoe.experiment.report.loading import Results
from omoe.experiment.report.rows import (
    SWEEP_X,
    Table,
    experiments,
    format_mean_std,
    group,
    mean_std,
    protocols,
    short,
    sort_key,
    swept,
)
from omoe.experiment.results import CellResult


def fig4(results: Results, x_key: str | None = None) -> Table:
    """Mean accuracy (over tasks per seed, then over seeds) against ``x_key``, one line per method
    and routing, one panel per setting and protocol."""
    cells = results.cells
    x_key = x_key or next(k for k in SWEEP_X if swept(cells, k))
    where: dict[str, tuple[str, object]] = {}

    def row_of(c: CellResult) -> tuple[tuple, str]:
        line, x = f"{c.method} ({_routing(c)})", c.config_value(x_key)
        where[f"{line} @ {x}"] = (line, x)
        return (c.method_index, line, sort_key(x)), f"{line} @ {x}"

    series: dict[tuple[str, str], dict[str, list]] = {}  # (setting, protocol) -> line -> [(x, values)]
    for protocol in protocols(cells):
        for setting in ("single", "multi"):
            rows, tasks = group(cells, setting, protocol, row_of)
            for row in rows:
                line, x = where[row.label]
                series.setdefault((setting, protocol), {}).setdefault(line, []).append(
                    (x, row.avg_values(tasks))
                )
    lines_md = [
        f"### Fig. 4: mean accuracy (%) against {x_key}, one line per method and routing",
        "",
        f"Experiment {experiments(cells)}; each point is the mean "
        "over the tasks per seed, then mean ± sample std (n−1) over seeds.",
        "",
        f"| setting | protocol | line | {short(x_key)} | accuracy |",
        "|---|---|---|---:|---:|",
    ]
    csv_rows = []
    for (setting, protocol), lines in series.items():
        for line, xs in lines.items():
            for x, values in xs:
                lines_md.append(f"| {setting} | {protocol} | {line} | {x} | {format_mean_std(values)} |")
                mean, std = mean_std([100 * v for v in values]) if values else (None, None)
                csv_rows.append({"setting": setting, "protocol": protocol, "line": line, x_key: x,
                                 "mean": mean, "std": std, "seeds": len(values)})  # fmt: skip
    return Table("fig4", "\n".join(lines_md), csv_rows, _plot_fig4(series, x_key))


def _routing(cell: CellResult) -> str:
    a = cell.train_config["adapter"]
    if a["method"] not in ("moe", "omoe"):
        return a["method"]
    if a["routing"] == "topk":
        return f"top-{a['top_k']}"
    return a["routing"]


def _plot_fig4(series: dict, x_key: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("fig4 needs matplotlib: pip install 'omoe[plots]'") from None
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.8), squeeze=False)
    for ax, ((setting, protocol), lines) in zip(axes[0], series.items()):
        for line, xs in lines.items():
            points = [
                mean_std([100 * v for v in values]) if values else (float("nan"), 0.0) for _, values in xs
            ]
            ax.errorbar([str(x) for x, _ in xs], [m for m, _ in points], yerr=[sd for _, sd in points],
                        marker="o", capsize=3, label=line)  # fmt: skip
        ax.set_xlabel(short(x_key))
        ax.set_ylabel(f"mean accuracy (%), {protocol}")
        ax.set_title(f"{setting}-task")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
