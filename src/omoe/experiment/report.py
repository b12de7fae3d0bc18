"""Paper-shaped tables from experiment results: Markdown, CSV and (Fig. 4) a PNG.

Tables (the OMoE paper's numbering):

- ``1``: single-task accuracy, rows = methods, columns = tasks + Avg, with #params;
- ``2``: single- vs multi-task, per method a single row, a multi row and their difference;
- ``3``: efficiency, from the JSON of ``omoe bench --table3``;
- ``4``: layer-wise OMoE (the paper's Tables 4-5), rows = ``adapter.orthogonal_layers``;
- ``10``: rank sweep, rows = method x ``adapter.r``, with #params;
- ``fig4``: mean accuracy against a swept key (default: the number of experts), one line per
  method and routing;
- ``answers``: per row and task, the share of test records given the most frequent prediction, beside
  the share of the most frequent gold answer: 100% means a constant answer, whose accuracy is only the
  label balance (read from each cell's answer counts, or from its predictions file when older results
  lack them);
- ``runs``: one row per cell with its wall times (load, train, eval) and hardware, and the totals;
- ``paired``: a reference method (default: the first OMoE row) minus each other method on the same
  test records, per-record results pooled over the seeds both have, with a 95% paired bootstrap
  interval over the records: accuracy, and the gold label's log-probability (``label`` protocol);
- ``logprob``: the mean gold-label log-probability per row and task, mean ± std over seeds.

``paired`` and ``logprob`` read each cell's records file (``<cell>.records.json.gz``, see
:mod:`omoe.experiment.stats`), or its predictions file when older results lack one; cells with
neither read ``n/a``.

Every accuracy is the mean over seeds with the sample standard deviation (n - 1), in percent; one
seed is written ``±0.0 (1 seed)``, and a row with fewer seeds than the table says how many it has.
The Avg column is computed per seed (mean over the tasks) and then averaged, over the seeds that
have every task. Every table names its evaluation protocol.

A report covers one prompt format (``eval.prompt`` of each cell; results without it are ``alpaca``):
results that mix formats need ``--prompt``, so no column ever holds two formats. The tables of a
format other than alpaca say so in their first line and are written as ``<table>-<format>.md``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omoe.errors import ConfigError
from omoe.experiment import stats
from omoe.experiment.stats import Estimate, Records
from omoe.utils import atomic_save_figure, atomic_write_text

TABLES = ("1", "2", "3", "4", "10", "fig4", "answers", "runs", "paired", "logprob")
BENCH_KIND = "omoe.bench.table3"
_SWEEP_X = ("adapter.num_experts", "adapter.top_k")


# ---------------------------------------------------------------------------- loading
@dataclass
class Results:
    cells: list[dict]
    benches: list[dict]
    source: Path
    per_record: dict[str, dict] = field(default_factory=dict, repr=False)  # cell id -> cell_records()
    prompt: str = "alpaca"  # the prompt format of every cell


def cell_prompt(cell: dict) -> str:
    """The prompt format a cell was trained and scored in (results from before formats: alpaca)."""
    return cell.get("eval", {}).get("prompt", "alpaca")


def load_results(path: str | Path, prompt: str | None = None) -> Results:
    """Cell results (``*.json`` of ``omoe experiment``) and Table-3 benchmarks in a directory, or
    one such JSON file. Other JSON files are ignored; a broken one is an error. ``prompt`` keeps the
    cells of one prompt format; without it, cells of several formats are an error."""
    from omoe.experiment.runner import RESULT_KIND

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"results not found: {path}")
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    cells, benches = [], []
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{f} is not a readable JSON file: {err}") from None
        kind = data.get("kind") if isinstance(data, dict) else None
        if kind == RESULT_KIND:
            cells.append(data)
        elif kind == BENCH_KIND:
            benches.append(data)
    if not cells and not benches:
        raise ConfigError(
            f"no experiment results in {path} (JSON files of omoe experiment, or of omoe bench --table3)"
        )
    counts = {p: sum(cell_prompt(c) == p for c in cells) for p in sorted(set(map(cell_prompt, cells)))}
    if prompt is not None:
        cells = [c for c in cells if cell_prompt(c) == prompt]
        if not cells and not benches:
            found = ", ".join(f"{p} ({n} cells)" for p, n in counts.items()) or "none"
            raise ConfigError(f"no cells of prompt format {prompt} in {path}; formats there: {found}")
    elif len(counts) > 1:
        found = ", ".join(f"{p} ({n} cells)" for p, n in counts.items())
        raise ConfigError(
            f"{path} mixes prompt formats: {found}; a table holds one format, choose one with --prompt"
        )
    return Results(cells, benches, path, prompt=prompt or next(iter(counts), "alpaca"))


def available_tables(results: Results, x_key: str | None = None, reference: str | None = None) -> list[str]:
    """The tables that ``results`` can fill, in the paper's order (``x_key``: Fig. 4's x axis;
    ``reference``: the paired table's reference row or method)."""
    settings = {c["setting"] for c in results.cells}
    out = []
    if "single" in settings:
        out.append("1")
    if "multi" in settings:
        out.append("2")
    if results.benches:
        out.append("3")
    if len({_adapter(c, "orthogonal_layers") for c in results.cells if _adapter(c, "method") == "omoe"}) > 1:
        out.append("4")
    if _swept(results.cells, "adapter.r"):
        out.append("10")
    if any(_swept(results.cells, k) for k in ([x_key] if x_key else _SWEEP_X)):
        out.append("fig4")
    if any(answer_counts(c) for c in results.cells):
        out.append("answers")
    if results.cells:
        out.append("runs")
    if _paired_possible(results, reference):
        out.append("paired")
    if any(r.gold_logprob is not None for c in results.cells for r in cell_records(results, c).values()):
        out.append("logprob")
    return out


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


def group(cells: list[dict], setting: str, protocol: str, row_of: Callable[[dict], tuple[tuple, str]]):
    """Rows (sorted) and tasks (in order of appearance) of the cells of one setting and protocol."""
    rows: dict[str, Row] = {}
    tasks: list[str] = []  # the experiment's task order, then any other test sets
    seen: set[str] = set()
    for c in cells:
        tasks += [t for t in c.get("tasks", []) if t not in tasks]
    for c in cells:
        if c["setting"] != setting:
            continue
        order, label = row_of(c)
        row = rows.setdefault(label, Row(order, label))
        row.params.add(c["trainable_parameters"])
        for task in c["eval_tasks"]:
            m = c["metrics"].get(task, {}).get(protocol)
            if m is None:
                continue
            if task not in tasks:
                tasks.append(task)
            seen.add(task)
            row.acc.setdefault(task, {})[c["seed"]] = m["accuracy"]
            row.n.setdefault(task, set()).add(m["n"])
    return sorted(rows.values(), key=lambda r: r.order), [t for t in tasks if t in seen]


def method_row(cells: list[dict]) -> Callable[[dict], tuple[tuple, str]]:
    """Rows = methods, with the values of any key swept in these cells."""
    varying = _varying_sweep_keys(cells)

    def row_of(c: dict) -> tuple[tuple, str]:
        label = c["method"]
        if varying:
            label += " (" + ", ".join(f"{_short(k)}={c['sweep'].get(k)}" for k in varying) + ")"
        return (c["method_index"], c["sweep_index"]), label

    return row_of


def _varying_sweep_keys(cells: list[dict]) -> list[str]:
    keys = dict.fromkeys(k for c in cells for k in c.get("sweep", {}))
    return [k for k in keys if len({json.dumps(c["sweep"].get(k)) for c in cells}) > 1]


# ---------------------------------------------------------------------------- tables
@dataclass
class Table:
    name: str  # table1, table2, ...
    markdown: str
    csv_rows: list[dict]
    figure: object = None  # a matplotlib Figure (fig4)


def build_tables(
    results: Results, which: list[str] | None = None, x_key: str | None = None, reference: str | None = None
) -> list[Table]:
    """The requested tables (default: every available one); ``reference``: see :func:`paired`."""
    if x_key is not None:
        from omoe.train import options
        from omoe.train.config import TrainConfig

        if x_key not in options.valid_keys(TrainConfig):
            raise ConfigError(
                f"unknown --x key {x_key}; valid keys: {', '.join(options.valid_keys(TrainConfig))}"
            )
    available = available_tables(results, x_key, reference)
    which = which or available
    if not which:
        raise ConfigError(f"no table can be built from {results.source}")
    builders = {
        "1": table1,
        "2": table2,
        "3": table3,
        "4": table4,
        "10": table10,
        "fig4": fig4,
        "answers": answers,
        "runs": runs,
        "paired": lambda r: paired(r, reference),
        "logprob": logprob,
    }
    out = []
    for name in which:
        if name not in TABLES:
            raise ConfigError(f"unknown table {name!r}; allowed: {', '.join(TABLES)}")
        if name not in available:
            raise ConfigError(
                f"table {name} cannot be built from {results.source}: {_needs(name)}; "
                f"available here: {', '.join(available) or 'none'}"
            )
        out.append(builders[name](results, x_key) if name == "fig4" else builders[name](results))
    if results.prompt != "alpaca":
        for t in out:
            t.name = f"{t.name}-{results.prompt}"
            t.markdown = f"Prompt format `{results.prompt}` (every cell).\n\n{t.markdown}"
            for row in t.csv_rows:
                row["prompt"] = results.prompt
    return out


def _needs(name: str) -> str:
    return {
        "1": "it needs single-task results (settings: [single])",
        "2": "it needs multi-task results (settings: [multi], best with single too)",
        "3": "it needs the JSON of omoe bench --table3",
        "4": "it needs OMoE results with more than one adapter.orthogonal_layers",
        "10": "it needs results that sweep adapter.r",
        "fig4": "it needs results that sweep its x key (default adapter.num_experts or adapter.top_k)",
        "runs": "it needs results of omoe experiment",
        "answers": "it needs answer counts in the results, or the cells' eval_predictions.jsonl in their work_dir",
        "paired": "it needs per-record results (records files, results since they were kept) of the reference "
        "(--reference, default: the first OMoE method) and of another method in the same setting",
        "logprob": "it needs per-record results of the label protocol (records files)",
    }[name]


def table1(results: Results) -> Table:
    cells = results.cells
    parts, csv_rows = [], []
    for protocol in _protocols(cells):
        rows, tasks = group(cells, "single", protocol, method_row(cells))
        header = f"### Table 1: single-task accuracy (%), protocol `{protocol}`"
        md, rows_csv = _accuracy_table(header, cells, rows, tasks, "method", protocol, "single")
        parts.append(md)
        csv_rows += rows_csv
    return Table("table1", "\n\n".join(parts), csv_rows)


def table2(results: Results) -> Table:
    cells = results.cells
    parts, csv_rows = [], []
    for protocol in _protocols(cells):
        row_of = method_row(cells)
        single, t1 = group(cells, "single", protocol, row_of)
        multi, t2 = group(cells, "multi", protocol, row_of)
        tasks = t1 + [t for t in t2 if t not in t1]
        seeds = _seed_count(single + multi)
        by_setting = {"single": {r.label: r for r in single}, "multi": {r.label: r for r in multi}}
        labels = [r.label for r in sorted(single + multi, key=lambda r: r.order)]
        lines = [
            f"### Table 2: single-task vs multi-task accuracy (%), protocol `{protocol}`",
            "",
            _caption(cells, tasks, seeds, single + multi),
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
                csv_rows.append(_csv_row(row, tasks, protocol=protocol, setting=setting))
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
    cells = [c for c in results.cells if _adapter(c, "method") == "omoe"]
    methods = {c["method"] for c in cells}

    def row_of(c: dict) -> tuple[tuple, str]:
        layers = _adapter(c, "orthogonal_layers")
        label = str(layers) if len(methods) == 1 else f"{c['method']}: {layers}"
        return (c["method_index"], c["sweep_index"]), label

    return _per_setting("table4", "Tables 4-5: layer-wise OMoE", "orthogonal_layers", cells, row_of)


def table10(results: Results) -> Table:
    cells = results.cells

    def row_of(c: dict) -> tuple[tuple, str]:
        return (c["method_index"], _adapter(c, "r")), f"{c['method']} r={_adapter(c, 'r')}"

    return _per_setting("table10", "Table 10: LoRA rank", "method, rank", cells, row_of)


def _per_setting(name, title, row_header, cells, row_of) -> Table:
    parts, csv_rows = [], []
    for protocol in _protocols(cells):
        for setting in ("single", "multi"):
            rows, tasks = group(cells, setting, protocol, row_of)
            if not rows:
                continue
            header = f"### {title}, {setting}-task accuracy (%), protocol `{protocol}`"
            md, rows_csv = _accuracy_table(header, cells, rows, tasks, row_header, protocol, setting)
            parts.append(md)
            csv_rows += rows_csv
    return Table(name, "\n\n".join(parts), csv_rows)


def _accuracy_table(header, cells, rows, tasks, row_header, protocol, setting) -> tuple[str, list[dict]]:
    seeds = _seed_count(rows)
    lines = [
        header,
        "",
        _caption(cells, tasks, seeds, rows),
        "",
        f"| {row_header} | #params | " + " | ".join(tasks) + " | Avg |",
        "|---|---:|" + "---:|" * (len(tasks) + 1),
    ]
    csv_rows = []
    for row in rows:
        cols = [format_mean_std(row.values(t), seeds) for t in tasks]
        cols.append(format_mean_std(row.avg_values(tasks), seeds))
        lines.append(f"| {row.label} | {row.params_text()} | " + " | ".join(cols) + " |")
        csv_rows.append(_csv_row(row, tasks, protocol=protocol, setting=setting))
    return "\n".join(lines), csv_rows


def _caption(cells, tasks, seeds, rows) -> str:
    experiments = ", ".join(dict.fromkeys(c["experiment"] for c in cells))
    n = ", ".join(f"{t} {_join(set().union(*(r.n.get(t, set()) for r in rows)))}" for t in tasks)
    models = _join({c["train_config"]["model"] for c in cells})
    return (
        f"Experiment {experiments}; model {models}; mean ± sample std (n−1) over {seeds} seed(s); "
        f"test records per task: {n}."
    )


def _csv_row(row: Row, tasks: list[str], **extra) -> dict:
    out = {**extra, "row": row.label, "trainable_parameters": row.params_text().replace(",", "")}
    for t, values in [*((t, row.values(t)) for t in tasks), ("avg", row.avg_values(tasks))]:
        if values:
            mean, std = mean_std([100 * v for v in values])
            out.update({f"{t}_mean": round(mean, 4), f"{t}_std": round(std, 4), f"{t}_seeds": len(values)})
        else:
            out.update({f"{t}_mean": None, f"{t}_std": None, f"{t}_seeds": 0})
    return out


def _delta(single: list[float], multi: list[float]) -> str:
    if not single or not multi:
        return "–"
    return f"{100 * (statistics.fmean(multi) - statistics.fmean(single)):+.1f}"


# ---------------------------------------------------------------------------- Table 3
def table3(results: Results) -> Table:
    parts, csv_rows = [], []
    for bench in results.benches:
        meta, rows = bench["meta"], bench["results"]
        lines = [
            f"### Table 3: efficiency, {meta['device']} ({meta['preset']} shape, {meta['weights']})",
            "",
            f"Generation of {meta['batch']} prompts x {meta['new_tokens']} new tokens (greedy, prompts of "
            f"{meta['prompt_tokens']} tokens), median of {meta['rounds']} rounds; {meta['dtype']} weights; "
            f"torch {meta['torch']}. Extra memory is over the base model measured in the same run; "
            + _peak_caption(meta),
            "",
            "| method | trainable params | adapter MiB | latency s | x base | extra peak MiB | x base peak | "
            "train activations MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]  # fmt: skip
        for r in rows:
            lines.append(
                f"| {r['method']} | {r['trainable']:,d} | {r['adapter_mib']:.1f} | {r['latency_s']:.3f} | "
                f"{r['latency_ratio']:.2f} | {_num(r.get('extra_peak_mib'), '.1f')} | "
                f"{_num(r.get('peak_ratio'), '.3f')} | {_num(r.get('train_saved_mib'), '.1f')} |"
            )
            csv_rows.append({"device": meta["device"], "preset": meta["preset"], **r})
        parts.append("\n".join(lines))
    return Table("table3", "\n\n".join(parts), csv_rows)


def _peak_caption(meta: dict) -> str:
    if not meta.get("peak_measured"):
        return "peak memory was not measured (shown as –)."
    if meta.get("peak_method", "cuda") == "cuda":
        return "peak = torch.cuda.max_memory_allocated during generation."
    return (
        "peak = parameters and buffers + the most tensor bytes alive at once during generation "
        "(CPU: torch profiler, per-op allocations)."
    )


def _num(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


# ---------------------------------------------------------------------------- Fig. 4
def fig4(results: Results, x_key: str | None = None) -> Table:
    """Mean accuracy (over tasks per seed, then over seeds) against ``x_key``, one line per method
    and routing, one panel per setting and protocol."""
    cells = results.cells
    x_key = x_key or next(k for k in _SWEEP_X if _swept(cells, k))
    where: dict[str, tuple[str, object]] = {}

    def row_of(c: dict) -> tuple[tuple, str]:
        line, x = f"{c['method']} ({_routing(c)})", _config_value(c, x_key)
        where[f"{line} @ {x}"] = (line, x)
        return (c["method_index"], line, _sort_key(x)), f"{line} @ {x}"

    series: dict[tuple[str, str], dict[str, list]] = {}  # (setting, protocol) -> line -> [(x, values)]
    for protocol in _protocols(cells):
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
        f"Experiment {', '.join(dict.fromkeys(c['experiment'] for c in cells))}; each point is the mean "
        "over the tasks per seed, then mean ± sample std (n−1) over seeds.",
        "",
        f"| setting | protocol | line | {_short(x_key)} | accuracy |",
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
            stats = [
                mean_std([100 * v for v in values]) if values else (float("nan"), 0.0) for _, values in xs
            ]
            ax.errorbar([str(x) for x, _ in xs], [m for m, _ in stats], yerr=[sd for _, sd in stats],
                        marker="o", capsize=3, label=line)  # fmt: skip
        ax.set_xlabel(_short(x_key))
        ax.set_ylabel(f"mean accuracy (%), {protocol}")
        ax.set_title(f"{setting}-task")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- answer spread
def answer_counts(cell: dict) -> dict[tuple[str, str], tuple[dict, dict]]:
    """(task, protocol) -> (prediction counts, gold answer counts) of one cell: from its metrics
    (results written since the counts were added), else from ``eval_predictions.jsonl`` in its work
    dir when that is still on disk; {} when neither is there."""
    out = {}
    for task, by_protocol in cell.get("metrics", {}).items():
        for protocol, m in by_protocol.items():
            if "prediction_counts" in m and "answer_counts" in m:
                out[(task, protocol)] = (m["prediction_counts"], m["answer_counts"])
    if out:
        return out
    path = Path(cell.get("work_dir", "")) / "eval_predictions.jsonl"
    if not cell.get("work_dir") or not path.is_file():
        return {}
    from omoe.eval.evaluate import answer_counts as count

    by_key: dict[tuple[str, str], list[dict]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            p = json.loads(line)
            by_key.setdefault((p["task"], p["protocol"]), []).append(p)
    return {
        k: (c["prediction_counts"], c["answer_counts"]) for k, c in ((k, count(v)) for k, v in by_key.items())
    }


def answers(results: Results) -> Table:
    """Share (%) of test records given the most frequent prediction, per row and task (mean over
    seeds), with the most frequent answer named; a last row gives the gold answers' majority share."""
    counted = [(c, counts) for c in results.cells if (counts := answer_counts(c))]  # read each file once
    cells = [c for c, _ in counted]
    row_of = method_row(cells)
    tasks = list(dict.fromkeys(t for c in cells for t in c["eval_tasks"]))
    parts, csv_rows = [], []
    for protocol in _protocols(cells):
        rows: dict[tuple, dict] = {}  # (order, setting, label) -> task -> [(top answer, share)]
        gold: dict[str, tuple[str, float]] = {}
        for c, counts in counted:
            order, label = row_of(c)
            row = rows.setdefault((order, c["setting"], label), {})
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
        for (_, setting, label), by_task in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            cols, csv_row = [], {"protocol": protocol, "setting": setting, "row": label}
            for t in used:
                if t not in by_task:
                    cols.append("–")
                    continue
                share = statistics.fmean(v for _, v in by_task[t])
                top = max(set(a for a, _ in by_task[t]), key=[a for a, _ in by_task[t]].count)
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
        parts.append("\n".join(lines))
    return Table("answers", "\n\n".join(parts), csv_rows)


# ---------------------------------------------------------------------------- wall times
def runs(results: Results) -> Table:
    """One row per cell: its wall times and hardware, in the experiment's order; then the totals."""
    cells = sorted(
        results.cells, key=lambda c: (c["seed"], c["setting"], c["method_index"], c["sweep_index"], c["cell"])
    )
    lines = [
        "### Runs: wall time per cell",
        "",
        f"Experiment {', '.join(dict.fromkeys(c['experiment'] for c in cells))}; seconds as recorded in each result "
        "(train: over all resumptions of the cell; load: the base model, 0 when an earlier cell of the same "
        "process had loaded it; total = load + train + eval).",
        "",
        "| cell | trainable params | load s | train s | eval s | total s | hardware | finished |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    csv_rows, totals = [], dict.fromkeys(("load", "train", "eval", "total"), 0.0)
    for c in cells:
        w, hw = dict(c.get("wall_seconds", {})), c.get("hardware", {})
        w["train"] = c.get("train", {}).get("wall_seconds", w.get("train", 0.0))  # over all resumptions
        w["total"] = w.get("load", 0.0) + w["train"] + w.get("eval", 0.0)
        where = (
            f"{hw.get('device_name', '?')} ({hw.get('device', '?')}, {hw.get('cpu_threads', '?')} threads)"
        )
        for k in totals:
            totals[k] += w.get(k, 0.0)
        lines.append(
            f"| {c['cell']} | {c['trainable_parameters']:,d} | {w.get('load', 0):.0f} | {w.get('train', 0):.0f} | "
            f"{w.get('eval', 0):.0f} | {w.get('total', 0):.0f} | {where} | {c.get('finished_at', '–')} |"
        )
        csv_rows.append({"cell": c["cell"], "trainable_parameters": c["trainable_parameters"],
                         **{f"{k}_s": w.get(k) for k in totals}, "hardware": where,
                         "finished_at": c.get("finished_at")})  # fmt: skip
    lines.append(
        f"| **{len(cells)} cells** | | {totals['load']:.0f} | {totals['train']:.0f} | {totals['eval']:.0f} | "
        f"{totals['total']:.0f} ({totals['total'] / 3600:.2f} h) | | |"
    )
    return Table("runs", "\n".join(lines), csv_rows)


# ---------------------------------------------------------------------------- per-record statistics
def cell_records(results: Results, cell: dict) -> dict[tuple[str, str], Records]:
    """(task, protocol) -> per-record results of ``cell``: from its records file (beside its result
    JSON), else from ``eval_predictions.jsonl`` in its work dir (older results); {} when neither is
    there. Each cell's file is read once."""
    if cell["cell"] not in results.per_record:
        results.per_record[cell["cell"]] = _read_cell_records(results, cell)
    return results.per_record[cell["cell"]]


def _read_cell_records(results: Results, cell: dict) -> dict[tuple[str, str], Records]:
    folder = results.source if results.source.is_dir() else results.source.parent
    if cell.get("records_file") and (folder / cell["records_file"]).is_file():
        return stats.read_records(folder / cell["records_file"])
    path = Path(cell.get("work_dir") or "") / "eval_predictions.jsonl"
    if not cell.get("work_dir") or not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    return stats.records_from_predictions([json.loads(line) for line in lines if line.strip()])


def reference_row(cells: list[dict], reference: str | None = None) -> str | None:
    """The paired table's reference row: ``reference`` as a row label or a method name, by default
    the first row (in the experiment's order) whose adapter is OMoE; None if there is none."""
    row_of = method_row(cells)
    rows: dict[str, tuple] = {}  # label -> (order, method name, adapter method)
    for c in cells:
        order, label = row_of(c)
        rows.setdefault(label, (order, c["method"], _adapter(c, "method")))
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


def _paired_possible(results: Results, reference: str | None) -> bool:
    ref = reference_row(results.cells, reference)
    if ref is None:
        return False
    row_of = method_row(results.cells)
    have = {(c["setting"], row_of(c)[1]) for c in results.cells if cell_records(results, c)}
    return any((setting, ref) in have for setting, label in have if label != ref)


def _record_sections(results: Results):
    """``(protocol, setting, rows, tasks, row -> task -> seed -> Records)`` per protocol and setting."""
    row_of = method_row(results.cells)
    for protocol in _protocols(results.cells):
        for setting in ("single", "multi"):
            rows, tasks = group(results.cells, setting, protocol, row_of)
            yield protocol, setting, rows, tasks, _per_record(results, setting, protocol, row_of)


def _per_record(
    results: Results, setting: str, protocol: str, row_of
) -> dict[str, dict[str, dict[int, Records]]]:
    """Row label -> task -> seed -> Records of the cells of one setting and protocol."""
    out: dict[str, dict[str, dict[int, Records]]] = {}
    for c in results.cells:
        if c["setting"] != setting:
            continue
        label = row_of(c)[1]
        for (task, proto), r in cell_records(results, c).items():
            if proto == protocol and task in c["eval_tasks"]:
                out.setdefault(label, {}).setdefault(task, {})[c["seed"]] = r
    return out


def _check_same_records(results: Results) -> None:
    """Every cell that has per-record results of a task has them for the same records."""
    first: dict[str, tuple[str, Records]] = {}
    for c in results.cells:
        for (task, _), r in cell_records(results, c).items():
            name, r0 = first.setdefault(task, (c["cell"], r))
            if not r0.same_records(r):
                n0, n1 = len(r0.index), len(r.index)
                what = f"{n0} vs {n1} records" if n0 != n1 else "as many records, but not the same ones"
                raise ConfigError(
                    f"paired: cells {name} and {c['cell']} do not cover the same {task} test records ({what}); "
                    "a paired comparison needs the same records in every cell (same eval split and limit)"
                )


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
    _check_same_records(results)
    parts, csv_rows = [], []
    for protocol, setting, rows, tasks, data in _record_sections(results):
        others = [r.label for r in rows if r.label != ref]
        if ref not in data or not any(label in data for label in others):
            continue
        md, rows_csv = _paired_section(cells, data, ref, others, tasks, setting, protocol)
        parts.append(md)
        csv_rows += rows_csv
    return Table("paired", "\n\n".join(parts), csv_rows)


def _paired_section(cells, data, ref, others, tasks, setting, protocol) -> tuple[str, list[dict]]:
    quantities = [q for q in _QUANTITIES if q[0] == "correct" or _has_logprob(data)]
    means: dict[tuple[str, str], dict[str, float]] = {}  # (row, quantity) -> task -> mean difference
    boots: dict[tuple[str, str], dict[str, np.ndarray]] = {}  # ... -> task -> (resamples,) bootstrap means
    common: dict[str, dict[str, list[int]]] = {}  # row -> task -> the seeds pooled
    n_records: dict[str, int] = {}
    for task in tasks:
        ref_seeds = data[ref].get(task, {})
        columns, keys = [], []
        for other in others:
            seeds = sorted(set(ref_seeds) & set(data.get(other, {}).get(task, {})))
            if not seeds:
                continue
            common.setdefault(other, {})[task] = seeds
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
        n_records[task] = len(values)
        # one generator per task (seeded by its name): the same resamples in every table and column
        drawn = stats.bootstrap_means(values, stats.RESAMPLES, (stats.SEED, zlib.crc32(task.encode())))
        for j, key in enumerate(keys):
            means.setdefault(key, {})[task] = float(values[:, j].mean())
            boots.setdefault(key, {})[task] = drawn[:, j]

    experiments = ", ".join(dict.fromkeys(c["experiment"] for c in cells))
    lines = [
        f"### Paired differences, {setting}-task, protocol `{protocol}`: {ref} minus each method, same test records",
        "",
        f"Experiment {experiments}. Per test record, {ref}'s result minus the method's in the same seed, averaged over "
        f"the seeds both have (`seeds`); each cell is the mean over the records and its 95% percentile bootstrap "
        f"interval [low, high] ({stats.RESAMPLES:,d} resamples of the records with replacement, seeded: the same "
        "output every run). Δ accuracy is in percentage points"
        + (
            "; Δ log p(gold) in nats, log p(gold) being log_softmax over the task's label logits at the gold label"
            if len(quantities) > 1
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
    csv_rows = []
    ref_seeds = set().union(*(data[ref].get(t, {}) for t in tasks))
    for other in others:
        pooled = sorted(set().union(*common.get(other, {}).values()))
        seeds_text = ", ".join(map(str, pooled)) or "–"
        other_seeds = set().union(*(data.get(other, {}).get(t, {}) for t in tasks))
        if pooled and ref_seeds != other_seeds:
            seeds_text += f" (common; {ref} has {len(ref_seeds)}, {other} {len(other_seeds)})"
        for field_name, text, scale, spec in quantities:
            key = (other, field_name)
            by_task = means.get(key, {})
            cols = []
            for t in tasks:
                if t not in by_task:
                    cols.append("n/a")
                    continue
                est = stats.estimates(by_task[t], boots[key][t][:, None])[0]
                note = (
                    "" if common[other][t] == pooled else f" (seeds {', '.join(map(str, common[other][t]))})"
                )
                cols.append(_interval(est, scale, spec) + note)
                csv_rows.append(_paired_csv(protocol, setting, ref, other, field_name, t, common[other][t],
                                            n_records[t], est, scale))  # fmt: skip
            if by_task and len(by_task) == len(tasks):
                avg = statistics.fmean(by_task[t] for t in tasks)
                est = stats.estimates(avg, np.mean([boots[key][t] for t in tasks], axis=0)[:, None])[0]
                cols.append(_interval(est, scale, spec))
                csv_rows.append(_paired_csv(protocol, setting, ref, other, field_name, "avg", pooled,
                                            sum(n_records[t] for t in tasks), est, scale))  # fmt: skip
            else:
                cols.append("n/a" if not by_task else "–")
            lines.append(f"| {other} | {seeds_text} | {text} | " + " | ".join(cols) + " |")
    return "\n".join(lines), csv_rows


def _has_logprob(data: dict) -> bool:
    return any(
        r.gold_logprob is not None
        for by_task in data.values()
        for by_seed in by_task.values()
        for r in by_seed.values()
    )


def _interval(est: Estimate, scale: float, spec: str) -> str:
    return f"{format(scale * est.mean, spec)} [{format(scale * est.low, spec)}, {format(scale * est.high, spec)}]"


def _paired_csv(protocol, setting, ref, other, quantity, task, seeds, n, est: Estimate, scale) -> dict:
    return {"protocol": protocol, "setting": setting, "reference": ref, "row": other,
            "quantity": "accuracy_points" if quantity == "correct" else "gold_logprob_nats", "task": task,
            "seeds": " ".join(map(str, seeds)), "records": n, "diff": round(scale * est.mean, 6),
            "ci_low": round(scale * est.low, 6), "ci_high": round(scale * est.high, 6)}  # fmt: skip


def logprob(results: Results) -> Table:
    """Mean gold-label log-probability (nats) per row and task: per cell the mean over the test
    records, then mean ± sample std over seeds; Avg per seed over the tasks, then over seeds."""
    cells = results.cells
    parts, csv_rows = [], []
    for protocol, setting, rows, tasks, data in _record_sections(results):
        if not _has_logprob(data):
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
            _caption(cells, tasks, seeds, rows)
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
    from omoe.data.tasks import get_task

    try:
        return -math.log(len(get_task(task).labels))
    except (ConfigError, KeyError):
        return None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


# ---------------------------------------------------------------------------- writing
def write_tables(tables: list[Table], output: str | Path) -> list[Path]:
    """Write each table's ``.md`` and ``.csv`` (and ``.png``) into ``output``, atomically."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file; give a directory")
    written = []
    for t in tables:
        md, csv_path = output / f"{t.name}.md", output / f"{t.name}.csv"
        if t.figure is not None:
            png = output / f"{t.name}.png"
            atomic_save_figure(t.figure, png)
            written.append(png)
        atomic_write_text(csv_path, _csv_text(t.csv_rows))
        atomic_write_text(md, t.markdown + "\n")
        written += [md, csv_path]
    return written


def _csv_text(rows: list[dict]) -> str:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# ---------------------------------------------------------------------------- small helpers
def _protocols(cells: list[dict]) -> list[str]:
    return list(dict.fromkeys(p for c in cells for p in c["eval"]["protocols"]))


def _seed_count(rows: list[Row]) -> int:
    return len({s for r in rows for by_seed in r.acc.values() for s in by_seed})


def _adapter(cell: dict, key: str):
    value = cell["train_config"]["adapter"][key]
    return tuple(value) if isinstance(value, list) else value


def _config_value(cell: dict, dotted: str):
    value = cell["train_config"]
    for part in dotted.split("."):
        value = value[part]
    return tuple(value) if isinstance(value, list) else value


def _swept(cells: list[dict], key: str) -> bool:
    return any(key in c.get("sweep", {}) for c in cells) and len({_config_value(c, key) for c in cells}) > 1


def _routing(cell: dict) -> str:
    a = cell["train_config"]["adapter"]
    if a["method"] not in ("moe", "omoe"):
        return a["method"]
    if a["routing"] == "topk":
        return f"top-{a['top_k']}"
    return a["routing"]


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _join(values: set) -> str:
    return "/".join(str(v) for v in sorted(values, key=_sort_key))


def _sort_key(value) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))
