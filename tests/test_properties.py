"""Property tests (Hypothesis) for the two parsers that read what users write: the training config
(YAML file or dotted overrides) and the record loader. Whatever the input, the result is a valid
object or the project's one-line error (an :class:`OMoEError`), never another exception."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omoe.data.loader import load_records
from omoe.data.tasks import get_task
from omoe.errors import OMoEError
from omoe.train.config import TrainConfig, load_config

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _flat(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        keys += _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return keys


KEYS = _flat(TrainConfig().to_dict())
SECTIONS = sorted({k.rsplit(".", 1)[0] for k in KEYS if "." in k})

# No subnormal floats: training and evaluation flush denormals process-wide (torch.set_flush_denormal),
# and Hypothesis refuses to generate them after that.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False)
    | st.text(max_size=12)
    | st.sampled_from(["lora", "omoe", "cosine", "cpu", "bf16", "boolq", "auto", "0", "1e-3", ""])
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip
# Mostly real keys (so that values reach the checks behind them), some mistyped or unknown ones.
keys = st.sampled_from(KEYS + SECTIONS) | st.text(max_size=12)


def _check_one_line_error(err: OMoEError) -> None:
    message = str(err)
    assert message and "\n" not in message, repr(message)


def _nest(flat: dict) -> dict:
    nested: dict = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = nested
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[last] = value
    return nested


@SETTINGS
@given(flat=st.dictionaries(keys, values, max_size=6))
def test_a_random_yaml_config_is_a_config_or_a_one_line_error(tmp_path, flat):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_nest(flat), allow_unicode=True))
    try:
        config = load_config(path)
    except OMoEError as err:
        _check_one_line_error(err)
    else:
        assert isinstance(config, TrainConfig)
        assert load_config(None, _flat_overrides(config)) == config  # what it parsed round-trips


def _flat_overrides(config: TrainConfig) -> dict:
    flat = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(config.to_dict())
    return flat


@SETTINGS
@given(overrides=st.dictionaries(keys, values, max_size=6))
def test_random_dotted_overrides_are_a_config_or_a_one_line_error(overrides):
    try:
        config = load_config(None, overrides)
    except OMoEError as err:
        _check_one_line_error(err)
    else:
        assert isinstance(config, TrainConfig)


@SETTINGS
@given(text=st.text(max_size=80))
def test_random_text_as_a_config_file_is_a_config_or_a_one_line_error(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except OMoEError as err:
        _check_one_line_error(err)


FIELDS = ["instruction", "input", "output", "answer"]
record_values = st.one_of(
    st.text(max_size=20), st.sampled_from(["true", "false", "answer1", "maybe", ""]), scalars, values
)
records = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), record_values, max_size=6)
documents = st.lists(records | values, max_size=4) | values


@SETTINGS
@given(document=documents, task=st.sampled_from([None, "boolq", "ARC-Easy", "winogrande"]), gz=st.booleans())
def test_a_random_data_file_is_records_or_a_one_line_error(tmp_path, document, task, gz):
    path = tmp_path / ("data.json.gz" if gz else "data.json")
    text = json.dumps(document)  # NaN as the bare token a loose writer leaves: the loader must cope
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    try:
        loaded = load_records(path, task)
    except OMoEError as err:
        _check_one_line_error(err)
    else:
        assert isinstance(loaded, list)
        for record in loaded:
            assert all(isinstance(record[f], str) for f in FIELDS), record
            if task is not None:
                assert record["answer"] in get_task(task).labels


@SETTINGS
@given(data=st.binary(max_size=64), gz=st.booleans())
def test_random_bytes_as_a_data_file_are_a_one_line_error(tmp_path, data, gz):
    path = tmp_path / ("data.json.gz" if gz else "data.json")
    Path(path).write_bytes(data)
    try:
        loaded = load_records(path, "boolq")
    except OMoEError as err:
        _check_one_line_error(err)
    else:
        assert loaded == [] or all(r["answer"] in ("true", "false") for r in loaded)


@pytest.mark.parametrize("bad", ["[1, 2", "{", "[]garbage", "\ufeff[]"])
def test_known_awkward_files_are_one_line_errors_or_records(tmp_path, bad):
    path = tmp_path / "data.json"
    path.write_text(bad, encoding="utf-8")
    try:
        load_records(path, "boolq")
    except OMoEError as err:
        _check_one_line_error(err)
