"""TrainConfig, YAML files and ``--key value`` flags: parsing, precedence, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from omoe import options
from omoe.cli.main import main
from omoe.config import OMoEConfig
from omoe.errors import ConfigError
from omoe.train.config import PAPER_TASKS, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TRAIN_YAMLS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("accelerate"))


def test_configs_directory_ships_paper_fast_and_fsdp_configs():
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert {"paper.yaml", "fast.yaml", "accelerate_fsdp.yaml"} <= names


@pytest.mark.parametrize("path", TRAIN_YAMLS, ids=lambda p: p.name)
def test_every_shipped_train_yaml_parses_into_a_train_config(path):
    config = load_config(path)
    assert isinstance(config, TrainConfig)
    assert isinstance(config.adapter, OMoEConfig)
    # the file names keys explicitly; nothing in it is silently ignored
    assert options.build(TrainConfig, yaml.safe_load(path.read_text())) == config


def test_paper_yaml_holds_the_papers_hyperparameters():
    c = load_config(CONFIGS / "paper.yaml")
    assert c.adapter == OMoEConfig()  # OMoE-LoRA, 2 experts, soft routing, r 16, alpha 32, dropout 0.05
    assert (c.optim.lr, c.optim.global_batch_size, c.optim.epochs) == (2e-4, 16, 2)
    assert c.optim.global_batch_size // c.optim.micro_batch_size == 8  # 8 accumulation steps on 1 process
    assert tuple(c.data.tasks) == PAPER_TASKS
    assert (c.data.cutoff_len, c.data.train_on_inputs) == (512, False)


def test_accelerate_fsdp_yaml_selects_fsdp_with_transformer_wrapping():
    data = yaml.safe_load((CONFIGS / "accelerate_fsdp.yaml").read_text())
    assert data["distributed_type"] == "FSDP"
    assert data["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert data["num_processes"] >= 2


def test_default_train_config_equals_paper_yaml_except_run_bookkeeping():
    paper, default = load_config(CONFIGS / "paper.yaml"), TrainConfig()
    assert paper.adapter == default.adapter and paper.data == default.data and paper.optim == default.optim


def test_to_yaml_round_trips_and_carries_help_text_as_comments(tmp_path):
    config = load_config(None, {"adapter.method": "moe", "adapter.top_k": 1, "optim.lr": 1e-3})
    text = config.to_yaml(header="hello")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert load_config(path) == config
    assert "# hello" in text
    assert "# peak learning rate of AdamW\n  lr: 0.001" in text


def test_cli_overrides_take_precedence_over_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\n  epochs: 3\nadapter:\n  method: lora\n")
    config = load_config(path, {"optim.lr": "5e-4", "adapter.r": "8"})
    assert config.optim.lr == 5e-4  # a string 5e-4 (PyYAML reads no float) is coerced
    assert config.optim.epochs == 3
    assert (config.adapter.method, config.adapter.r) == ("lora", 8)


def test_cli_values_are_parsed_by_type():
    to = options.parse_cli_value
    t = options.key_type
    assert (
        options.coerce(to("null", t(TrainConfig, "adapter.top_k")), t(TrainConfig, "adapter.top_k"), "k")
        is None
    )
    assert options.coerce(to("true", t(TrainConfig, "adapter.use_dora")), bool, "k") is True
    tasks = options.coerce(
        to("ARC-Easy,boolq", t(TrainConfig, "data.tasks")), t(TrainConfig, "data.tasks"), "k"
    )
    assert tasks == ["ARC-Easy", "boolq"]
    layers_tp = t(TrainConfig, "adapter.orthogonal_layers")
    assert options.coerce(to("0-9,20-29", layers_tp), layers_tp, "k") == "0-9,20-29"
    assert options.coerce(to("[0, 3]", layers_tp), layers_tp, "k") == [0, 3]
    assert options.coerce(to("smollm2", str), str, "k") == "smollm2"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"optim": {"lrr": 1}}, "unknown config key(s) optim.lrr; valid keys: optim.lr,"),
        ({"bogus": 1}, "valid keys: model, output_dir,"),
        ({"adapter": {"method": "lorra"}}, "unknown method 'lorra'; allowed: lora, dora, moe, omoe"),
        ({"optim": {"lr": -1}}, "optim.lr must be a finite number > 0"),
        ({"optim": {"lr": "fast"}}, "optim.lr must be a number, got 'fast'"),
        (
            {"optim": {"global_batch_size": 16, "micro_batch_size": 3}},
            "must be a multiple of optim.micro_batch_size",
        ),
        ({"optim": {"warmup_ratio": 1.5}}, "optim.warmup_ratio must be in [0, 1)"),
        ({"optim": {"schedule": "step"}}, "allowed: linear, cosine, constant"),
        ({"data": {"tasks": ["ARC-Easy", "nope"]}}, "unknown task 'nope'; valid tasks:"),
        ({"data": {"prompt": "mixlora"}}, "unknown data.prompt 'mixlora'; allowed: alpaca, moe-peft"),
        ({"data": {"split": "val"}}, "unknown data.split 'val'; allowed: train, train+val"),
        ({"data": {"data_file": "x.json"}}, "data.data_file needs data.task"),
        ({"data": {"cutoff_len": 0}}, "data.cutoff_len must be an integer >= 1"),
        ({"precision": "fp8"}, "allowed: auto, fp32, bf16, fp16"),
        ({"adapter": {"top_k": 3}}, "top_k=3 exceeds num_experts=2"),
        ({"adapter": []}, "adapter must be a mapping"),
        ({"checkpoint_every": -1}, "checkpoint_every must be an integer >= 0"),
    ],
)
def test_bad_config_values_raise_a_config_error_that_says_what_is_allowed(data, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_data_file_replaces_the_bundled_tasks():
    config = TrainConfig.from_dict({"data": {"data_file": "mine.json", "task": "boolq"}})
    assert config.data.tasks is None and config.data.task == "boolq"


def test_global_batch_must_split_over_the_processes():
    optim = TrainConfig.from_dict({"optim": {"global_batch_size": 12, "micro_batch_size": 4}}).optim
    assert optim.accumulation_steps(1) == 3
    assert optim.accumulation_steps(3) == 1
    with pytest.raises(ConfigError, match="cannot be split over 2 processes"):
        optim.accumulation_steps(2)


def test_warmup_ratio_replaces_warmup_steps():
    optim = TrainConfig.from_dict({"optim": {"warmup_steps": 100, "warmup_ratio": 0.1}}).optim
    assert optim.warmup_for(250) == 25


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optim.lrr", "1"], "unknown option(s) --optim.lrr; valid keys: --model,"),
        (["--adapter.method", "foo"], "unknown method 'foo'"),
        (["--optim.lr", "0"], "optim.lr must be a finite number > 0"),
        (["--tasks", "ARC-Easy,hellaswagg"], "unknown task 'hellaswagg'"),
        (["--config", "does/not/exist.yaml"], "config file not found: does/not/exist.yaml"),
        (["--optim.max_steps"], "expected one argument"),
    ],
)
def test_train_cli_reports_bad_input_in_one_line_with_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(["train", *argv]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_train_cli_rejects_malformed_yaml_in_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("optim: [unclosed\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is not valid YAML" in err and err.count("\n") == 1


def test_train_cli_rejects_a_missing_data_file_before_loading_a_model(tmp_path, capsys):
    argv = [
        "train",
        "--data-file",
        str(tmp_path / "none.json"),
        "--task",
        "boolq",
        "--output_dir",
        str(tmp_path),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "data file not found" in err and err.count("\n") == 1


def test_train_cli_resume_without_checkpoint_is_a_one_line_error(tmp_path, capsys):
    argv = [
        "train",
        "--config",
        str(CONFIGS / "fast.yaml"),
        "--output_dir",
        str(tmp_path / "run"),
        "--resume",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--resume: no checkpoint in" in err and err.count("\n") == 1


def test_print_config_shows_the_resolved_yaml(capsys):
    assert (
        main(["train", "--config", str(CONFIGS / "fast.yaml"), "--optim.lr", "3e-3", "--print-config"]) == 0
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 3e-3
    assert printed["data"]["tasks"] == ["ARC-Easy", "boolq", "openbookqa"]


def test_help_lists_every_config_key_with_its_help_text(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for key in options.valid_keys(TrainConfig):
        assert f"--{key}" in out
    assert "peak learning rate of AdamW" in out


def test_docs_field_table_matches_the_dataclass():
    from omoe.train.docs import fields_table

    assert fields_table() in (ROOT / "docs" / "training.md").read_text()
