"""What the tables read: the cell results of ``omoe experiment`` (:class:`CellResult`), the JSON of
``omoe bench --table3``, and each cell's per-record results beside them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from omoe.errors import ConfigError
from omoe.experiment import stats
from omoe.experiment.results import RESULT_KIND, CellResult
from omoe.experiment.stats import Records

BENCH_KIND = "omoe.bench.table3"


@dataclass
class Results:
    cells: list[CellResult]
    benches: list[dict]
    source: Path
    per_record: dict[str, dict] = field(default_factory=dict, repr=False)  # cell id -> cell_records()
    prompt: str = "alpaca"  # the prompt format of every cell


def load_results(path: str | Path, prompt: str | None = None) -> Results:
    """Cell results (``*.json`` of ``omoe experiment``) and Table-3 benchmarks in a directory, or
    one such JSON file. Other JSON files are ignored; a broken one is an error. ``prompt`` keeps the
    cells of one prompt format; without it, cells of several formats are an error."""
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
            cells.append(CellResult.from_dict(data, str(f)))
        elif kind == BENCH_KIND:
            benches.append(data)
    if not cells and not benches:
        raise ConfigError(
            f"no experiment results in {path} (JSON files of omoe experiment, or of omoe bench --table3)"
        )
    counts = {p: sum(c.prompt == p for c in cells) for p in sorted({c.prompt for c in cells})}
    if prompt is not None:
        cells = [c for c in cells if c.prompt == prompt]
        if not cells and not benches:
            found = ", ".join(f"{p} ({n} cells)" for p, n in counts.items()) or "none"
            raise ConfigError(f"no cells of prompt format {prompt} in {path}; formats there: {found}")
    elif len(counts) > 1:
        found = ", ".join(f"{p} ({n} cells)" for p, n in counts.items())
        raise ConfigError(
            f"{path} mixes prompt formats: {found}; a table holds one format, choose one with --prompt"
        )
    return Results(cells, benches, path, prompt=prompt or next(iter(counts), "alpaca"))


def cell_records(results: Results, cell: CellResult) -> dict[tuple[str, str], Records]:
    """(task, protocol) -> per-record results of ``cell``: from its records file (beside its result
    JSON), else from ``eval_predictions.jsonl`` in its work dir (older results); {} when neither is
    there. Each cell's file is read once."""
    if cell.cell not in results.per_record:
        results.per_record[cell.cell] = _read_cell_records(results, cell)
    return results.per_record[cell.cell]


def _read_cell_records(results: Results, cell: CellResult) -> dict[tuple[str, str], Records]:
    folder = results.source if results.source.is_dir() else results.source.parent
    if cell.records_file and (folder / cell.records_file).is_file():
        return stats.read_records(folder / cell.records_file)
    predictions = read_predictions(cell)
    return stats.records_from_predictions(predictions) if predictions is not None else {}


def read_predictions(cell: CellResult) -> list[dict] | None:
    """The lines of ``eval_predictions.jsonl`` in the cell's work dir; None when it is gone."""
    path = Path(cell.work_dir or "") / "eval_predictions.jsonl"
    if not cell.work_dir or not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]
