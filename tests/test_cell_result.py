"""``CellResult``, the typed result of one experiment cell: its JSON round-trips, the committed
result files (written before ``eval.prompt`` and ``records_file`` existed) load and write back to the
same bytes, and a file of a newer schema or one missing a key is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omoe.cli.main import main
from omoe.errors import ConfigError
from omoe.experiment.results import RESULT_KIND, SCHEMA_VERSION, CellResult, EvalSummary, Score, WallSeconds
from omoe.utils import json_text

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted((ROOT / "results").rglob("*.json"))


def full_result() -> CellResult:
    return CellResult(
        experiment="exp", description="d", config_file="experiments/x.yaml", cell="omoe__multi__seed1",
        method="omoe", method_index=1, method_overrides={"adapter.r": 8}, setting="multi",
        tasks=["boolq", "ARC-Easy"], train_tasks=["boolq", "ARC-Easy"], eval_tasks=["boolq"], seed=1,
        sweep={"adapter.num_experts": 4}, sweep_index=2, fingerprint="0123456789abcdef",
        train_config={"model": "m", "adapter": {"method": "omoe", "r": 8, "orthogonal_layers": [0, 1]}},
        trainable_parameters=1234,
        eval=EvalSummary(protocols=["label"], prompt="moe-peft", limit=40, batch_size=8, max_new_tokens=32,
                         num_beams=1, splits={"boolq": "test"}),
        metrics={"boolq": {"label": Score(accuracy=0.75, n=4, correct=3, no_match=0, seconds=0.5,
                                          prediction_counts={"true": 4}, answer_counts={"true": 3, "false": 1})}},
        hardware={"device": "cpu", "cpu_threads": 2}, wall_seconds=WallSeconds(load=1.0, train=2.0, eval=3.0, total=6.0),
        records_file="omoe__multi__seed1.records.json.gz", work_dir="runs/x", finished_at="2026-12-01T00:00:00+00:00",
    )  # fmt: skip


def test_a_cell_result_round_trips_through_its_json():
    result = full_result()
    data = json.loads(json_text(result.to_dict()))
    assert data["kind"] == RESULT_KIND and data["schema"] == SCHEMA_VERSION
    back = CellResult.from_dict(data)
    assert back == result
    assert back.to_dict() == data and list(back.to_dict()) == list(data)
    assert back.config_value("adapter.orthogonal_layers") == (0, 1) and back.adapter("r") == 8
    assert list(data["metrics"]["boolq"]["label"]) == ["accuracy", "n", "correct", "no_match", "seconds",
                                                      "prediction_counts", "answer_counts"]  # fmt: skip


@pytest.mark.parametrize("path", COMMITTED, ids=[p.stem for p in COMMITTED])
def test_a_committed_old_schema_result_loads_and_writes_back_the_same_bytes(path):
    text = path.read_text(encoding="utf-8")
    saved = json.loads(text)
    assert "prompt" not in saved["eval"] and "records_file" not in saved  # written before both existed
    result = CellResult.from_dict(saved, str(path))
    assert result.prompt == "alpaca" and result.records_file is None
    assert (
        result.metrics[result.eval_tasks[0]][result.eval.protocols[0]].accuracy
        == (saved["metrics"][result.eval_tasks[0]][result.eval.protocols[0]]["accuracy"])
    )
    data = result.to_dict()  # the keys added since, at the values that mean what the old file meant
    assert data.pop("records_file") is None and data["eval"].pop("prompt") == "alpaca"
    assert json_text(data, indent=2, ensure_ascii=False) + "\n" == text


def test_committed_results_are_found():
    assert len(COMMITTED) >= 40


def test_a_newer_schema_or_a_missing_key_is_a_one_line_error(tmp_path, capsys):
    data = full_result().to_dict()
    with pytest.raises(ConfigError, match=r"^r\.json: result schema 2; this omoe reads schema 1 to 1"):
        CellResult.from_dict({**data, "schema": SCHEMA_VERSION + 1}, "r.json")
    with pytest.raises(ConfigError, match=r"^r\.json: a cell result needs the key 'eval'$"):
        CellResult.from_dict({k: v for k, v in data.items() if k != "eval"}, "r.json")
    with pytest.raises(ConfigError, match=r"^r\.json: not a well-formed cell result .*'seed'"):
        CellResult.from_dict({k: v for k, v in data.items() if k != "seed"}, "r.json")
    with pytest.raises(ConfigError, match="is not a result of omoe experiment"):
        CellResult.from_dict({**data, "kind": "other"}, "r.json")
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "a.json").write_text(json_text({**data, "schema": SCHEMA_VERSION + 1}))
    out = tmp_path / "out"
    assert main(["report", "--results", str(folder), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "a.json: result schema 2" in err and len(err.splitlines()) == 1
    assert not out.exists()
