"""The bad-input table of docs/reliability.md, driven by :data:`CASES`: every case runs the CLI
(``omoe.cli.main.main``) on the tiny random LLaMA, and must print exactly one error line, exit with
the table's status and leave nothing under the final output names; the table row is rebuilt from
what the program printed and must equal the committed one, so the page cannot drift.

After changing a message, rewrite the table with
``OMOE_WRITE_RELIABILITY=1 .venv/bin/python -m pytest -q tests/test_bad_inputs.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omoe import OMoEConfig, get_omoe_model
from omoe.cli.main import main
from omoe.models.testing import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- bad-inputs: begin (tests/test_bad_inputs.py) -->", "<!-- bad-inputs: end -->"
TRAIN_OUT = ("out/adapter_model.safetensors", "out/train_results.json")
EVAL_OUT = ("res.json", "res.predictions.jsonl")
WRITE = os.environ.get("OMOE_WRITE_RELIABILITY") == "1"


@dataclass(frozen=True)
class Case:
    key: str
    what: str  # the bad input, as the table names it
    command: str  # the command of the row, as the table shows it
    argv: Callable[[Path, Path], list[str]]  # (tmp, model dir) -> argv; writes the files it needs
    code: int
    absent: tuple[str, ...]  # paths under tmp that must not exist afterwards
    patch: Callable[[pytest.MonkeyPatch], None] | None = None  # injects a runtime fault


# ---------------------------------------------------------------------------- building the inputs
def _train(yaml_text: str):
    """``omoe train --config c.yaml`` with ``yaml_text`` as the file."""

    def argv(tmp: Path, model: Path) -> list[str]:
        (tmp / "c.yaml").write_text(yaml_text.format(model=model, out=tmp / "out"))
        return ["train", "--config", str(tmp / "c.yaml")]

    return argv


TINY_TRAIN = """model: {model}
output_dir: {out}
device: cpu
data: {{tasks: [boolq], limit: 4, cutoff_len: CUTOFF, train_on_inputs: false}}
optim: {{global_batch_size: 4, micro_batch_size: 2, max_steps: 2, warmup_steps: 0}}
logging: {{progress: false, tensorboard: false}}
"""


def _eval(*extra: str, model: Callable[[Path, Path], Path] | None = None):
    """``omoe eval --model M --protocol label --limit 2 --output res.json`` plus ``extra``; the
    ``{tmp}`` in an extra argument is the case's directory. ``model`` builds another model dir."""

    def argv(tmp: Path, base: Path) -> list[str]:
        path = base if model is None else model(tmp, base)
        args = [a.format(tmp=tmp) for a in extra]
        if "--task" not in args and "--tasks" not in args:
            args = ["--tasks", "boolq", *args]
        return ["eval", "--model", str(path), "--protocol", "label", "--limit", "2", *args,
                "--output", str(tmp / "res.json"), "--no-progress"]  # fmt: skip

    return argv


def _data_file(content: str):
    def argv(tmp: Path, model: Path) -> list[str]:
        (tmp / "data.json").write_text(content)
        return _eval("--task", "boolq", "--data-file", "{tmp}/data.json")(tmp, model)

    return argv


def _adapter(damage: Callable[[Path], None] | None = None, **model_overrides):
    """An r=4 LoRA adapter saved for the tiny LLaMA (or for one built with ``model_overrides``), then
    ``damage(adapter_dir)``; evaluated with ``--adapter``."""

    def argv(tmp: Path, model: Path) -> list[str]:
        path = tmp / "adapter"
        get_omoe_model(tiny_llama(0, **model_overrides), OMoEConfig(method="lora", r=4)).save_pretrained(path)
        if damage is not None:
            damage(path)
        return _eval("--adapter", str(path))(tmp, model)

    return argv


def _trained_moe_peft(path: Path) -> None:
    (path / "train_config.yaml").write_text("data:\n  prompt: moe-peft\n")  # as omoe train writes it


def _config_r8(path: Path) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))


def _truncate(path: Path) -> None:
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])


def _pickle_instead(path: Path) -> None:
    torch.save(load_file(path / "adapter_model.safetensors"), path / "adapter_model.bin")
    (path / "adapter_model.safetensors").unlink()


def _one_nan(path: Path) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, path / "adapter_model.safetensors")


def _no_pad_no_eos(tmp: Path, base: Path) -> Path:
    path = tmp / "model-without-pad"
    shutil.copytree(base, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    for key in ("pad_token", "eos_token"):
        config.pop(key, None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    special = path / "special_tokens_map.json"
    if special.exists():
        special.unlink()
    return path


def _nan_weights(tmp: Path, base: Path) -> Path:
    """A model directory whose final norm holds a NaN: every score it gives is NaN."""
    from transformers import AutoTokenizer

    path = tmp / "model-nan"
    model = tiny_llama(0)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------- runtime faults
def _nan_loss(monkeypatch):
    from omoe.train import trainer

    real = trainer.token_loss_sum
    monkeypatch.setattr(trainer, "token_loss_sum", lambda *a, **k: real(*a, **k) * float("nan"))


def _full_disk(monkeypatch):
    import errno

    real = Path.write_text

    def full(self, data, *args, **kwargs):
        if self.name.startswith(".res.json."):  # atomic_write's temporary file of res.json
            real(self, data[:50], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "res.json.tmp")
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)


def _ctrl_c_in(module: str, name: str):
    """Send this process a real SIGINT (Ctrl-C) from inside ``module.name``."""

    def patch(monkeypatch):
        import importlib

        target = importlib.import_module(module)

        def interrupted(*args, **kwargs):
            signal.raise_signal(signal.SIGINT)
            raise AssertionError("SIGINT did not interrupt")

        monkeypatch.setattr(target, name, interrupted)

    return patch


GOOD_TRAIN = TINY_TRAIN.replace("CUTOFF", "128")

CASES = [
    # configuration
    Case("yaml", "malformed YAML", "omoe train --config c.yaml", _train("optim: [1, 2\n"), 2, TRAIN_OUT),
    Case("yaml-list", "YAML that is not a mapping", "omoe train --config c.yaml", _train("- lr\n- 0.1\n"), 2, TRAIN_OUT),
    Case("key", "unknown (mistyped) config key", "omoe train --config c.yaml", _train("optim:\n  l_r: 0.1\n"), 2, TRAIN_OUT),
    Case("type", "value of the wrong type", "omoe train --config c.yaml", _train("optim:\n  lr: fast\n"), 2, TRAIN_OUT),
    Case("range", "out-of-range value", "omoe train --config c.yaml", _train("optim:\n  lr: -1\n"), 2, TRAIN_OUT),
    Case("flag-range", "out-of-range option", "omoe eval ... --limit 0", _eval("--limit", "0"), 2, EVAL_OUT),
    Case("task", "unknown task", "omoe eval --tasks boolqq ...", _eval("--tasks", "boolqq"), 2, EVAL_OUT),
    # data
    Case("missing-field", "record without a required field", "omoe eval --task boolq --data-file data.json ...",
         _data_file('[{"instruction": "Is it?"}]'), 2, EVAL_OUT),
    Case("label", "record with an unknown label", "omoe eval --task boolq --data-file data.json ...",
         _data_file('[{"instruction": "Is it?", "input": "", "output": "the correct answer is maybe", '
                    '"answer": "maybe"}]'), 2, EVAL_OUT),
    Case("empty", "empty data file (`[]`)", "omoe eval --task boolq --data-file data.json ...", _data_file("[]"), 2,
         EVAL_OUT),
    Case("zero-bytes", "empty data file (0 bytes)", "omoe eval --task boolq --data-file data.json ...",
         _data_file(""), 2, EVAL_OUT),
    Case("not-json", "data file that is not JSON", "omoe eval --task boolq --data-file data.json ...",
         _data_file('[{"instruction": '), 2, EVAL_OUT),
    Case("cutoff", "every prompt longer than `cutoff_len`", "omoe train --config c.yaml (data.cutoff_len 8)",
         _train(TINY_TRAIN.replace("CUTOFF", "8")), 2, TRAIN_OUT),
    # model and tokenizer
    Case("no-model", "missing model directory", "omoe eval --model nowhere/ ...",
         _eval(model=lambda tmp, base: tmp / "nowhere"), 2, EVAL_OUT),
    Case("no-pad", "tokenizer with neither a pad nor an EOS token", "omoe eval --model M ...",
         _eval(model=_no_pad_no_eos), 2, EVAL_OUT),
    # adapters
    Case("no-adapter", "missing adapter directory", "omoe eval --adapter nowhere/ ...",
         _eval("--adapter", "{tmp}/nowhere"), 2, EVAL_OUT),
    Case("shape", "adapter of the wrong shape (config says r=8, tensors hold r=4)", "omoe eval --adapter A ...",
         _adapter(_config_r8), 2, EVAL_OUT),
    Case("truncated", "truncated adapter file", "omoe eval --adapter A ...", _adapter(_truncate), 2, EVAL_OUT),
    Case("pickle", "a pickle (`adapter_model.bin`) where safetensors is expected", "omoe eval --adapter A ...",
         _adapter(_pickle_instead), 2, EVAL_OUT),
    Case("other-base", "adapter saved for another base model (hidden size 32, not 64)", "omoe eval --adapter A ...",
         _adapter(hidden_size=32), 2, EVAL_OUT),
    Case("nan-adapter", "adapter holding a NaN", "omoe eval --adapter A ...", _adapter(_one_nan), 2, EVAL_OUT),
    Case("other-prompt", "adapter trained with another prompt format (moe-peft, evaluated with alpaca)",
         "omoe eval --adapter A ...", _adapter(_trained_moe_peft), 2, EVAL_OUT),
    # failures on valid input (exit 1) and Ctrl-C (exit 130)
    Case("nan-loss", "the loss becomes NaN", "omoe train --config c.yaml", _train(GOOD_TRAIN), 1, TRAIN_OUT,
         _nan_loss),
    Case("nan-score", "a model whose scores are NaN", "omoe eval --model M ...", _eval(model=_nan_weights), 1,
         EVAL_OUT),
    Case("full-disk", "the disk fills up while results are written", "omoe eval ... --output res.json", _eval(),
         1, EVAL_OUT, _full_disk),
    Case("sigint-train", "Ctrl-C (SIGINT) during training", "omoe train --config c.yaml", _train(GOOD_TRAIN), 130,
         TRAIN_OUT, _ctrl_c_in("omoe.train.trainer", "_accumulate")),
    Case("sigint-eval", "Ctrl-C (SIGINT) during evaluation", "omoe eval ...", _eval(), 130, EVAL_OUT,
         _ctrl_c_in("omoe.eval.label", "next_token_scores")),
]  # fmt: skip


# ---------------------------------------------------------------------------- the table
def table_row(case: Case, message: str) -> str:
    cells = [case.what, f"`{case.command}`", f"`{message}`", str(case.code)]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def doc_rows() -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    body = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    return [line for line in body.strip().splitlines()[2:]]  # after the header and its rule


def write_row(case: Case, row: str) -> None:
    """OMOE_WRITE_RELIABILITY=1: put ``row`` into the table at the case's place in CASES."""
    text = DOC.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN)
    body, tail = rest.split(END)
    lines = body.strip().splitlines()
    header, rows = lines[:2], {_what(r): r for r in lines[2:]}
    rows[case.what.replace("|", "\\|")] = row
    order = [c.what for c in CASES]
    ordered = [rows[w] for w in order if w in rows]
    DOC.write_text(f"{head}{BEGIN}\n" + "\n".join(header + ordered) + f"\n{END}{tail}", encoding="utf-8")


def _what(row: str) -> str:
    return re.split(r"(?<!\\)\|", row)[1].strip()


@pytest.mark.parametrize("case", CASES, ids=[c.key for c in CASES])
def test_bad_input_gives_one_line_its_exit_status_and_no_output(
    case, tmp_path, tiny_model_dir, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    argv = case.argv(tmp_path, tiny_model_dir)
    if case.patch is not None:
        case.patch(monkeypatch)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"omoe {argv[0]}: ")]
    said = [line for line in lines if "error:" in line or line.endswith("interrupted")]
    assert code == case.code, err
    assert len(said) == 1, err
    leftover = [p for p in case.absent if (tmp_path / p).exists()]
    assert leftover == [], f"{case.key} left {leftover}"
    message = said[0].replace(str(tiny_model_dir), "<model>").replace(str(tmp_path), "<tmp>")
    row = table_row(case, message)
    if WRITE:
        write_row(case, row)
    assert row in doc_rows(), f"docs/reliability.md lacks (or differs from) the row\n{row}"


def test_the_table_has_one_row_per_case_in_order():
    assert [_what(r) for r in doc_rows()] == [c.what.replace("|", "\\|") for c in CASES]
    assert all(r.endswith((" 1 |", " 2 |", " 130 |")) for r in doc_rows())
