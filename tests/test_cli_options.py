"""Every sub-command's options come from one dataclass (omoe.options): ``--config FILE.yaml`` with
``--key value`` on top, one-line errors from argparse too, and the shared range check."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from omoe import options
from omoe.analysis import AnalysisSpec
from omoe.cli.main import build_parser, main
from omoe.errors import ConfigError
from omoe.yamlio import to_yaml


def _err(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_params_reads_its_config_file_and_a_flag_overrides_it(tmp_path, capsys):
    config = tmp_path / "params.yaml"
    config.write_text("shape: llama2-13b\nset: [method=lora, r=8]\n")
    assert main(["params", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "on llama2-13b (40 blocks" in out and "| custom |" in out and "LoRA r16" not in out
    assert main(["params", "--config", str(config), "--shape", "smollm2-135m"]) == 0
    assert "on smollm2-135m (30 blocks" in capsys.readouterr().out


@pytest.mark.parametrize(
    "command,yaml_text,message",
    [
        ("bench", "steps: 0\n", "--steps must be an integer >= 1, got 0"),
        ("bench", "stepz: 3\n", "unknown config key(s) stepz; valid keys: preset, variants, steps"),
        ("eval", "protocol: label\ntasks: boolq\nlimit: 0\n", "--limit must be an integer >= 1 or null, got 0"),
        ("analyze", "task: boolq\n", "give at least one --adapter DIR"),
        ("params", "shape: gpt5\n", "unknown shape 'gpt5'"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_key(tmp_path, capsys, command, yaml_text, message):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    extra = ["--output", str(tmp_path / "out.json")] if command == "eval" else []
    assert main([command, "--config", str(config), *extra]) == 2
    assert message in _err(capsys)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "--bogus", "1"], "omoe bench: error: unknown option(s) --bogus; valid keys: --preset"),
        (["params", "--shape"], "omoe params: error: argument --shape"),
        (["analyze", "--tokens"], "omoe analyze: error: argument --tokens"),
        (["report"], "omoe report: error: the following arguments are required"),
    ],
)
def test_argparse_errors_of_every_command_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert _err(capsys).startswith(message)


def test_repeated_negated_and_list_flags_reach_the_dataclass():
    args = build_parser().parse_args(
        ["analyze", "--adapter", "a", "--adapter", "b,c", "--no-tsne", "--layers", "0,3", "--batch-size", "4"]
    )
    data = options.config_data(args, AnalysisSpec)
    assert data == {"adapters": ["a", "b,c"], "tsne": False, "layers": "0,3", "batch_size": 4}
    assert options.coerce(data["layers"], options.key_type(AnalysisSpec, "layers"), "layers") == [0, 3]


@pytest.mark.parametrize("value,low,nullable,ok", [(3, 1, False, True), (0, 1, False, False), (True, 0, False, False),
                                                   (None, 1, True, True), (None, 1, False, False), (2.0, 1, False, False)])  # fmt: skip
def test_check_int_is_the_one_range_check(value, low, nullable, ok):
    if ok:
        options.check_int("k", value, low, nullable=nullable)
    else:
        with pytest.raises(ConfigError, match=f"k must be an integer >= {low}{' or null' if nullable else ''}, got"):
            options.check_int("k", value, low, nullable=nullable)


def test_the_old_module_name_is_the_options_module():
    from omoe.train import options as old

    assert old is options


@dataclasses.dataclass
class _One:
    x: object = dataclasses.field(default=None, metadata={"help": "the one key"})


@pytest.mark.parametrize("value", ["wait...", "...", "a", 0.001, 2, None, ["a", "b"], True])
def test_to_yaml_writes_each_value_so_that_yaml_reads_it_back(value):
    # a plain string ending in '...' used to lose it (PyYAML's document-end marker was cut twice)
    text = to_yaml(_One(value))
    assert text.startswith("# the one key\nx: ")
    assert yaml.safe_load(text) == {"x": value}
