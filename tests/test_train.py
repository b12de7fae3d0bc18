"""The training loop on a tiny random LLaMA with the real SmolLM2 tokenizer: loss, files, invariances,
checkpoints, and a SIGKILLed run that resumes to the same weights."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omoe import OMoEModel
from omoe.errors import ConfigError
from omoe.models.testing import tiny_llama
from omoe.train import checkpoint as ckpt
from omoe.train import distributed, lr_factor, train
from omoe.train.config import load_config
from omoe.train.metrics import read_metrics
from omoe.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

# boolq records are ~70 tokens; cut to 32 and train on every token to keep steps cheap on CPU.
TINY = {
    "data.tasks": ["boolq"],
    "data.limit": 16,
    "data.cutoff_len": 32,
    "data.train_on_inputs": True,
    "optim.global_batch_size": 4,
    "optim.micro_batch_size": 2,
    "optim.max_steps": 4,
    "optim.warmup_steps": 1,
    "optim.lr": 1e-2,
    "logging.progress": False,
    "logging.tensorboard": False,
    "device": "cpu",
}


def tiny_config(tmp_path, name="run", **overrides):
    return load_config(None, {**TINY, "output_dir": str(tmp_path / name), **overrides})


def run_tiny(tmp_path, tokenizer, name="run", seed=0, **overrides):
    return train(tiny_config(tmp_path, name, **overrides), model=tiny_llama(seed), tokenizer=tokenizer)


# ---------------------------------------------------------------------------- schedule
def test_lr_schedule_warms_up_linearly_then_decays_to_zero():
    factors = [lr_factor(s, warmup=4, total=12, schedule="linear") for s in range(12)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4:] == pytest.approx([1 - k / 8 for k in range(8)])
    cosine = [lr_factor(s, warmup=0, total=10, schedule="cosine") for s in range(10)]
    assert (
        cosine[0] == 1.0
        and cosine[5] == pytest.approx(0.5)
        and all(a > b for a, b in itertools.pairwise(cosine))
    )
    assert lr_factor(99, warmup=2, total=10, schedule="constant") == 1.0


# ---------------------------------------------------------------------------- a run and its files
def test_training_lowers_the_loss_and_writes_adapter_config_and_metrics(tmp_path, smollm2_tokenizer):
    result = run_tiny(tmp_path, smollm2_tokenizer, **{"optim.max_steps": 6})
    out = result.output_dir
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5
    for name in ("adapter_model.safetensors", "adapter_config.json", "train_config.yaml", "metrics.jsonl",
                 "metrics.csv", "train_results.json"):  # fmt: skip
        assert (out / name).is_file(), name
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert set(rows[0]) == {
        "step",
        "epoch",
        "loss",
        "aux_loss",
        "lr",
        "grad_norm",
        "tokens",
        "tokens_per_s",
        "elapsed_s",
    }
    assert rows[0]["aux_loss"] is not None and rows[0]["tokens_per_s"] > 0
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("step,epoch,loss,aux_loss,lr") and len(csv_lines) == 7
    summary = json.loads((out / "train_results.json").read_text())
    assert summary["num_truncated"] == 16 and summary["steps"] == 6  # every record is longer than 32 tokens


def test_saved_adapter_reloads_to_the_same_outputs(tmp_path, smollm2_tokenizer):
    result = run_tiny(tmp_path, smollm2_tokenizer, **{"optim.max_steps": 2})
    reloaded = OMoEModel.from_pretrained(tiny_llama(0), result.output_dir)
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits, rtol=0, atol=0
        )


def test_train_config_yaml_in_output_dir_reproduces_the_config(tmp_path, smollm2_tokenizer):
    config = tiny_config(tmp_path, **{"optim.max_steps": 1})
    train(config, model=tiny_llama(0), tokenizer=smollm2_tokenizer)
    assert load_config(Path(config.output_dir) / "train_config.yaml") == config


@pytest.mark.parametrize(
    "adapter",
    [
        {"adapter.method": "lora"},
        {"adapter.method": "dora"},
        {"adapter.method": "moe", "adapter.top_k": 1, "adapter.router_aux_loss_coef": 0.01},
        {"adapter.method": "omoe", "adapter.topology": "linear", "adapter.num_experts": 3},
        {"adapter.method": "omoe", "adapter.orthogonal_layers": "0", "adapter.use_dora": True},
    ],
    ids=["lora", "dora", "moe-top1-aux", "omoe-linear-3", "omoe-dora-layer0"],
)
def test_every_method_trains_and_changes_its_adapter_weights(tmp_path, smollm2_tokenizer, adapter):
    config = tiny_config(tmp_path, **{"optim.max_steps": 2, **adapter})
    from omoe import get_omoe_model

    torch.manual_seed(config.seed)
    initial = get_omoe_model(tiny_llama(0), config.adapter).adapter_state_dict()
    result = train(config, model=tiny_llama(0), tokenizer=smollm2_tokenizer)
    final = result.model.adapter_state_dict()
    assert final.keys() == initial.keys()
    assert any(not torch.equal(final[k], initial[k]) for k in final)
    assert all(math.isfinite(r["loss"]) for r in result.history)
    assert (result.history[0]["aux_loss"] is not None) == config.adapter.is_moe


def test_router_aux_loss_coef_changes_the_update(tmp_path, smollm2_tokenizer):
    moe = {"adapter.method": "moe", "adapter.top_k": 1, "optim.max_steps": 2}
    plain = run_tiny(tmp_path, smollm2_tokenizer, "plain", **moe)
    aux = run_tiny(tmp_path, smollm2_tokenizer, "aux", **moe, **{"adapter.router_aux_loss_coef": 1.0})
    # the logged LM loss excludes the aux term: the first step's losses are equal ...
    assert aux.history[0]["loss"] == pytest.approx(plain.history[0]["loss"], abs=1e-6)
    # ... but the router gradient differs, so the weights do
    a, b = plain.model.adapter_state_dict(), aux.model.adapter_state_dict()
    assert any("router" in k and not torch.allclose(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- invariances
def test_micro_batch_size_does_not_change_the_training(tmp_path, smollm2_tokenizer):
    # Untruncated records of different lengths: a per-micro-batch mean would weight tokens differently
    # from the global-batch token mean. Dropout masks are seeded per micro-batch, so turn dropout off.
    # Vanilla MoE: at OMoE's initialisation the experts are equal, so Gram-Schmidt normalises rounding
    # noise and the first gradient's direction depends on the padding (see docs/training.md).
    # Soft routing, no aux loss: the load-balancing loss is a per-forward-pass statistic.
    common = {"optim.max_steps": 3, "adapter.dropout": 0.0, "data.cutoff_len": 128, "optim.lr": 1e-3,
              "adapter.method": "moe"}  # fmt: skip
    one = run_tiny(tmp_path, smollm2_tokenizer, "mb4", **common, **{"optim.micro_batch_size": 4})
    four = run_tiny(tmp_path, smollm2_tokenizer, "mb1", **common, **{"optim.micro_batch_size": 1})
    assert one.num_truncated == 0
    assert [r["loss"] for r in one.history] == pytest.approx([r["loss"] for r in four.history], abs=1e-5)
    a, b = one.model.adapter_state_dict(), four.model.adapter_state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_gradient_checkpointing_does_not_change_the_training(tmp_path, smollm2_tokenizer):
    common = {"optim.max_steps": 2, "adapter.router_aux_loss_coef": 0.1}
    plain = run_tiny(tmp_path, smollm2_tokenizer, "plain", **common)
    ckpt_run = run_tiny(tmp_path, smollm2_tokenizer, "gc", gradient_checkpointing=True, **common)
    assert (
        ckpt_run.model.base_model.is_gradient_checkpointing
        and not plain.model.base_model.is_gradient_checkpointing
    )
    a, b = plain.model.adapter_state_dict(), ckpt_run.model.adapter_state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_dropout_is_active_and_reproducible(tmp_path, smollm2_tokenizer):
    # step 1 cannot show it (LoRA B starts at 0, so dropout's input to A does not reach the output yet)
    steps = {"optim.max_steps": 2}
    a = run_tiny(tmp_path, smollm2_tokenizer, "a", **steps, **{"adapter.dropout": 0.5})
    b = run_tiny(tmp_path, smollm2_tokenizer, "b", **steps, **{"adapter.dropout": 0.5})
    off = run_tiny(tmp_path, smollm2_tokenizer, "off", **steps, **{"adapter.dropout": 0.0})
    assert a.history[1]["loss"] == b.history[1]["loss"]
    assert a.history[1]["loss"] != off.history[1]["loss"]


# ---------------------------------------------------------------------------- checkpoints and resume
def test_checkpoints_keep_the_newest_k_and_load_with_weights_only(tmp_path, smollm2_tokenizer):
    result = run_tiny(
        tmp_path, smollm2_tokenizer, **{"optim.max_steps": 5, "checkpoint_every": 1, "keep_checkpoints": 2}
    )
    found = ckpt.list_checkpoints(result.output_dir)
    assert [p.name for p in found] == ["step-00000004", "step-00000005"]
    state = torch.load(found[-1] / ckpt.STATE_PT, weights_only=True)
    assert set(state) == {"optimizer", "scheduler", "scaler", "rng"}
    info = json.loads((found[-1] / ckpt.STATE_JSON).read_text())
    assert (info["step"], info["epoch"], info["index"]) == (5, 1, 4)  # 4 steps per epoch of 16 records
    final, last = (
        load_file(result.output_dir / "adapter_model.safetensors"),
        load_file(found[-1] / ckpt.WEIGHTS),
    )
    assert all(torch.equal(final[k], last[k]) for k in final)


def test_an_interrupted_checkpoint_write_leaves_no_checkpoint(tmp_path, smollm2_tokenizer, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        run_tiny(tmp_path, smollm2_tokenizer, **{"optim.max_steps": 2, "checkpoint_every": 1})
    root = tmp_path / "run" / ckpt.CHECKPOINTS
    assert list(root.iterdir()) == []  # neither step-* nor a .tmp-* directory
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_resume_without_a_checkpoint_is_a_config_error(tmp_path, smollm2_tokenizer):
    with pytest.raises(ConfigError, match="no checkpoint in"):
        train(tiny_config(tmp_path), model=tiny_llama(0), tokenizer=smollm2_tokenizer, resume=True)


def test_a_finished_output_dir_is_not_overwritten(tmp_path, smollm2_tokenizer):
    run_tiny(tmp_path, smollm2_tokenizer, **{"optim.max_steps": 1})
    with pytest.raises(ConfigError, match="already holds a training run; pass --resume"):
        run_tiny(tmp_path, smollm2_tokenizer, **{"optim.max_steps": 1})


def test_resume_refuses_a_changed_config(tmp_path, smollm2_tokenizer):
    run_tiny(tmp_path, smollm2_tokenizer, **{"optim.max_steps": 2, "checkpoint_every": 1})
    changed = tiny_config(tmp_path, **{"optim.max_steps": 2, "checkpoint_every": 1, "optim.lr": 5e-3})
    with pytest.raises(ConfigError, match=r"config differs in optim.lr \(0.01 -> 0.005\)"):
        train(changed, model=tiny_llama(0), tokenizer=smollm2_tokenizer, resume=True)


def test_sigkilled_run_resumes_to_the_weights_of_an_uninterrupted_run(
    tmp_path, tiny_model_dir, smollm2_tokenizer
):
    """Dropout on, 12 steps, checkpoint every 3; kill -9 a CLI run after step 5, then --resume."""
    settings = {**TINY, "model": str(tiny_model_dir), "optim.max_steps": 12, "optim.lr": 1e-3,
                "checkpoint_every": 3, "adapter.dropout": 0.1, "data.limit": 12}  # fmt: skip
    reference = train(load_config(None, {**settings, "output_dir": str(tmp_path / "ref")}))

    killed = load_config(None, {**settings, "output_dir": str(tmp_path / "killed")})
    (tmp_path / "killed.yaml").write_text(killed.to_yaml())
    proc = subprocess.Popen(
        [sys.executable, "-m", "omoe.cli.main", "train", "--config", str(tmp_path / "killed.yaml")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        rows = read_metrics(metrics)
        if rows and rows[-1]["step"] >= 5:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "adapter_model.safetensors").exists()
    assert ckpt.latest_checkpoint(tmp_path / "killed") is not None

    resumed = train(killed, resume=True)
    ref, res = (
        load_file(reference.output_dir / "adapter_model.safetensors"),
        load_file(resumed.output_dir / "adapter_model.safetensors"),
    )
    max_diff = max((ref[k] - res[k]).abs().max().item() for k in ref)
    print(f"SIGKILLed + resumed vs uninterrupted: max abs adapter weight difference {max_diff:.1e}")
    assert max_diff <= 1e-6
    # the metrics file reads as one run: same steps, same losses
    a, b = read_metrics(reference.output_dir / "metrics.jsonl"), read_metrics(metrics)
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-6)


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rows]


def test_trainer_steps_taken_by_hand_equal_a_train_call_bit_for_bit(tmp_path, smollm2_tokenizer):
    """Trainer.setup(), step() twice, save(), close(), finish(): the rows, the checkpoint (weights and
    optimizer state) and the adapter of train() with max_steps 2 and checkpoint_every 2, dropout on."""
    settings = {"optim.max_steps": 2, "checkpoint_every": 2, "adapter.dropout": 0.1}
    reference = run_tiny(tmp_path, smollm2_tokenizer, "ref", **settings)
    config = tiny_config(tmp_path, "by-hand", **settings)
    trainer = Trainer(config, distributed.setup("cpu"), model=tiny_llama(0), tokenizer=smollm2_tokenizer)
    trainer.setup()
    rows = [trainer.step(), trainer.step()]
    assert trainer.global_step == 2 and trainer.history == rows
    trainer.save()
    trainer.close()
    result = trainer.finish()
    assert _without_timing(rows) == _without_timing(reference.history)
    step2 = Path(ckpt.CHECKPOINTS) / "step-00000002"
    for name in (ckpt.WEIGHTS, step2 / ckpt.WEIGHTS):
        a, b = load_file(reference.output_dir / name), load_file(result.output_dir / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = (torch.load(d / step2 / ckpt.STATE_PT, weights_only=True)["optimizer"]["state"]
            for d in (reference.output_dir, result.output_dir))  # fmt: skip
    assert a.keys() == b.keys() and all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])
    assert read_metrics(result.output_dir / "metrics.jsonl") == rows


# ---------------------------------------------------------------------------- precision
def test_training_records_the_precision_it_used(tmp_path, smollm2_tokenizer, monkeypatch):
    from omoe.models import precision

    monkeypatch.setenv(precision.CPU_BF16_ENV, "1")
    result = run_tiny(tmp_path, smollm2_tokenizer, "auto", **{"optim.max_steps": 1})
    assert json.loads((result.output_dir / "train_results.json").read_text())["precision"] == "bf16"
    assert math.isfinite(result.history[0]["loss"])
    monkeypatch.setenv(precision.CPU_BF16_ENV, "0")
    result = run_tiny(tmp_path, smollm2_tokenizer, "fallback", **{"optim.max_steps": 1})
    assert json.loads((result.output_dir / "train_results.json").read_text())["precision"] == "fp32"


# ---------------------------------------------------------------------------- length-grouped batches
def _lengths_data(n=230, global_batch=4, micro=2, seed=3, group=True):
    """Examples of random lengths 5..199; 230 of them in batches of 4 are mega-batches of 200 and 30."""
    from omoe.train.data import TrainData

    g = torch.Generator().manual_seed(0)
    examples = []
    for length in torch.randint(5, 200, (n,), generator=g).tolist():
        ids = torch.ones(length, dtype=torch.long)
        examples.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    return TrainData(examples, 0, global_batch, micro, seed, group_by_length=group)


def _padded_tokens(data, epoch):
    order = data.permutation(epoch)
    chunks = [order[i : i + data.micro_batch_size] for i in range(0, len(order), data.micro_batch_size)]
    return sum(len(c) * max(data.lengths[i] for i in c) for c in chunks)


def test_length_grouped_epochs_visit_every_example_once_in_a_seeded_order():
    data = _lengths_data()
    orders = [data.permutation(e) for e in range(3)]
    assert all(sorted(o) == list(range(230)) for o in orders)
    assert orders[0] != orders[1] != orders[2]
    again = _lengths_data()  # a fresh object (a resumed run) computes the same order for any step
    assert [again.global_batch(s) for s in (150, 3, 57)] == [data.global_batch(s) for s in (150, 3, 57)]
    assert _lengths_data(seed=4).permutation(0) != orders[0]
    # the micro-batch size (and so the number of processes) cuts a global batch but does not change it
    batches = [data.global_batch(s) for s in range(58)]
    assert [_lengths_data(micro=4).global_batch(s) for s in range(58)] == batches
    assert [_lengths_data(micro=1).global_batch(s) for s in range(58)] == batches
    assert [len(b) for b in batches[-2:]] == [4, 2]  # the short batch closes the epoch


def test_length_grouping_pads_less_and_keeps_batches_within_a_length_band():
    grouped, plain = _lengths_data(), _lengths_data(group=False)
    real = sum(grouped.lengths)
    assert _padded_tokens(grouped, 0) < 1.05 * real < 1.2 * real < _padded_tokens(plain, 0)
    spread = [max(grouped.lengths[i] for i in b) - min(grouped.lengths[i] for i in b)
              for b in map(grouped.global_batch, range(57))]  # fmt: skip
    assert max(spread) < 40  # lengths 5..199 drawn at random: a random batch of 4 spans ~100
