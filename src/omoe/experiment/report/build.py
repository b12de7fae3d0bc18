"""Which tables results can fill, building the requested ones, and writing them (Markdown, CSV,
PNG)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from omoe import options
from omoe.errors import ConfigError
from omoe.experiment.report.accuracy import table1, table2, table4, table10
from omoe.experiment.report.efficiency import table3
from omoe.experiment.report.goldprob import logprob
from omoe.experiment.report.loading import Results, cell_records
from omoe.experiment.report.paired import paired
from omoe.experiment.report.records import paired_possible
from omoe.experiment.report.rows import SWEEP_X, Table, swept
from omoe.experiment.report.spread import answer_counts, answers
from omoe.experiment.report.sweep import fig4
from omoe.experiment.report.walltime import runs
from omoe.train.config import TrainConfig
from omoe.utils import atomic_save_figure, atomic_write_text

TABLES = ("1", "2", "3", "4", "10", "fig4", "answers", "runs", "paired", "logprob")
_NEEDS = {
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
}


def available_tables(results: Results, x_key: str | None = None, reference: str | None = None) -> list[str]:
    """The tables that ``results`` can fill, in the paper's order (``x_key``: Fig. 4's x axis;
    ``reference``: the paired table's reference row or method)."""
    cells = results.cells
    settings = {c.setting for c in cells}
    out = []
    if "single" in settings:
        out.append("1")
    if "multi" in settings:
        out.append("2")
    if results.benches:
        out.append("3")
    if len({c.adapter("orthogonal_layers") for c in cells if c.adapter("method") == "omoe"}) > 1:
        out.append("4")
    if swept(cells, "adapter.r"):
        out.append("10")
    if any(swept(cells, k) for k in ([x_key] if x_key else SWEEP_X)):
        out.append("fig4")
    if any(answer_counts(c) for c in cells):
        out.append("answers")
    if cells:
        out.append("runs")
    if paired_possible(results, reference):
        out.append("paired")
    if any(r.gold_logprob is not None for c in cells for r in cell_records(results, c).values()):
        out.append("logprob")
    return out


def build_tables(
    results: Results, which: list[str] | None = None, x_key: str | None = None, reference: str | None = None
) -> list[Table]:
    """The requested tables (default: every available one); ``reference``: see :func:`paired`."""
    if x_key is not None and x_key not in options.valid_keys(TrainConfig):
        raise ConfigError(
            f"unknown --x key {x_key}; valid keys: {', '.join(options.valid_keys(TrainConfig))}"
        )
    available = available_tables(results, x_key, reference)
    which = which or available
    if not which:
        raise ConfigError(f"no table can be built from {results.source}")
    builders = {
        "1": table1, "2": table2, "3": table3, "4": table4, "10": table10, "fig4": lambda r: fig4(r, x_key),
        "answers": answers, "runs": runs, "paired": lambda r: paired(r, reference), "logprob": logprob,
    }  # fmt: skip
    out = []
    for name in which:
        if name not in TABLES:
            raise ConfigError(f"unknown table {name!r}; allowed: {', '.join(TABLES)}")
        if name not in available:
            raise ConfigError(
                f"table {name} cannot be built from {results.source}: {_NEEDS[name]}; "
                f"available here: {', '.join(available) or 'none'}"
            )
        out.append(builders[name](results))
    if results.prompt != "alpaca":
        for t in out:
            t.name = f"{t.name}-{results.prompt}"
            t.markdown = f"Prompt format `{results.prompt}` (every cell).\n\n{t.markdown}"
            for row in t.csv_rows:
                row["prompt"] = results.prompt
    return out


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
