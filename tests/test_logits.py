"""Logits only where they are used (``omoe.models.logits``): the training loss and the ``label`` and
``loglik`` scores equal those of the full ``(B, T, vocab)`` logits, while the LM head sees fewer rows."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from omoe import OMoEConfig, get_omoe_model
from omoe.bench import full_logits_loss_sum
from omoe.data import load_task
from omoe.data.prompts import build_prompt
from omoe.data.tasks import get_task
from omoe.data.tokenize import IGNORE_INDEX, collate, tokenize_dataset
from omoe.errors import OMoEError
from omoe.eval import evaluate
from omoe.eval.batching import pad
from omoe.eval.label import label_tokens
from omoe.models.logits import last_block_mlp, logits_only_at, selected_logits
from omoe.models.testing import tiny_llama
from omoe.train.trainer import token_loss_sum

WIDE = {"initializer_range": 0.5}  # spread logits: no near-ties that rounding could flip


def _head_rows(model):
    """Record how many rows the LM head computes in each call."""
    rows = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: rows.append(out.shape[:-1].numel())
    )
    return rows, handle


def _omoe_batch(smollm2_tokenizer):
    torch.manual_seed(0)
    model = get_omoe_model(tiny_llama(0), OMoEConfig(dropout=0.0))
    with torch.no_grad():  # B = 0 at initialisation would leave A without gradient
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    model.train()
    records = load_task("ARC-Easy", "train", limit=3) + load_task("boolq", "train", limit=2)
    examples = tokenize_dataset(smollm2_tokenizer, records, cutoff_len=160).examples
    return model, collate(examples, smollm2_tokenizer.pad_token_id)  # right-padded, prompts masked


def test_loss_at_supervised_positions_equals_full_logits_loss_and_gradients(smollm2_tokenizer):
    model, batch = _omoe_batch(smollm2_tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert 0 < supervised < batch["attention_mask"].sum() // 4  # responses are short: the saving is real

    rows, handle = _head_rows(model)
    new = token_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    new_grads = torch.autograd.grad(new, params)
    old = full_logits_loss_sum(model, batch["labels"], input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"])  # fmt: skip
    old_grads = torch.autograd.grad(old, params)
    handle.remove()

    assert rows == [supervised, batch["input_ids"].numel()]  # the head ran on M rows, then on B*T
    assert_close(new, old, rtol=1e-6, atol=1e-5)
    for a, b in zip(new_grads, old_grads):
        assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in new_grads)


def test_loss_at_supervised_positions_under_bf16_autocast_is_close_to_fp32(smollm2_tokenizer):
    model, batch = _omoe_batch(smollm2_tokenizer)
    fp32 = token_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = token_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16)
    assert_close(bf16, fp32, rtol=2e-2, atol=0)


def _full_and_selected(model):
    """A right-padded (3, 7) batch, 4 positions to keep, and the model's full and selected logits."""
    ids = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    keep = torch.zeros(3, 7, dtype=torch.bool)
    keep[0, [1, 6]] = keep[1, 4] = keep[2, 0] = True
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        got = selected_logits(model, ids, mask, keep)  # (M, V)
    return ids, mask, keep, full, got


def test_selected_logits_are_the_rows_of_the_full_logits_in_row_major_order():
    model = tiny_llama(0, vocab_size=128)
    _, _, keep, full, got = _full_and_selected(model)
    assert got.shape == (4, 128)
    assert_close(got, full[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("adapter", ["base", "omoe"])
def test_without_gradients_the_last_blocks_mlp_runs_on_the_read_positions_only(adapter):
    """In evaluation the last block's MLP (its output reaches only the head) sees the kept rows
    alone, and the logits are still the full forward's; with gradients it sees every row (an MoE
    router's statistics and load-balancing loss must cover all tokens); afterwards it is restored."""
    torch.manual_seed(0)
    model = tiny_llama(0, vocab_size=128)
    if adapter == "omoe":
        model = get_omoe_model(model, OMoEConfig(dropout=0.0))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.05)
    mlp = last_block_mlp(model)
    assert mlp is not None
    rows = []
    probe = mlp.omoe_router if adapter == "omoe" else mlp.gate_proj  # called as a module inside the MLP
    handle = probe.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[:-1].numel()))
    ids, mask, keep, full, got = _full_and_selected(model)
    assert rows == [21, 4]
    assert_close(got, full[keep], rtol=1e-5, atol=1e-5)
    selected_logits(model, ids, mask, keep).sum().backward()
    assert rows[-1] == 21 and "forward" not in vars(mlp)
    handle.remove()


def test_a_head_that_does_not_see_batch_by_position_hidden_states_is_an_error():
    model = tiny_llama(0, vocab_size=128)
    with (
        pytest.raises(OMoEError, match=r"expected \(B, T\) = \(2, 9\)"),
        logits_only_at(model, torch.ones(2, 9, dtype=torch.bool)),
    ):
        model(input_ids=torch.ones(2, 5, dtype=torch.long))


def _label_scores_full_logits(model, tokenizer, task, records, batch_size):
    """The label protocol's scores as they were computed before: full logits, then the last row."""
    prefix, label_ids = label_tokens(tokenizer, get_task(task).labels)
    prompts = tokenizer([build_prompt(r, with_output=False) for r in records])["input_ids"]
    inputs = [[*p, *prefix] for p in prompts]
    scores = []
    for start in range(0, len(inputs), batch_size):
        ids, mask = pad(inputs[start : start + batch_size], tokenizer.pad_token_id, side="right")
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        last = mask.sum(1) - 1
        scores.append(logits[torch.arange(len(ids)), last][:, label_ids])  # (B, labels)
    return torch.cat(scores)


@pytest.mark.parametrize("task", ["boolq", "ARC-Easy"])
def test_label_predictions_and_scores_equal_those_of_the_full_logits(smollm2_tokenizer, task):
    model = tiny_llama(0, **WIDE)
    records = load_task(task, limit=7)
    rows, handle = _head_rows(model)
    _, predictions = evaluate(model, smollm2_tokenizer, task, records, "label", batch_size=3,
                              progress=False, precision="fp32")  # fmt: skip
    handle.remove()
    assert rows == [3, 3, 1]  # one row per prompt: its last position
    with torch.inference_mode():
        old = _label_scores_full_logits(model, smollm2_tokenizer, task, records, batch_size=1)
    new = torch.tensor([list(p["scores"].values()) for p in predictions])
    assert_close(new, old, rtol=0, atol=1e-4)
    labels = get_task(task).labels
    assert [p["prediction"] for p in predictions] == [labels[int(i)] for i in old.argmax(1)]


@pytest.mark.real_model
def test_label_predictions_of_the_bundled_model_equal_those_of_the_full_logits():
    from omoe.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct")
    for task in ("ARC-Easy", "boolq"):
        records = load_task(task, limit=6)
        _, predictions = evaluate(model, tokenizer, task, records, "label", batch_size=3, progress=False,
                                  precision="fp32")  # fmt: skip
        with torch.inference_mode():
            old = _label_scores_full_logits(model, tokenizer, task, records, batch_size=3)
        assert [p["prediction"] for p in predictions] == [
            get_task(task).labels[int(i)] for i in old.argmax(1)
        ]
        new = torch.tensor([list(p["scores"].values()) for p in predictions])
        assert_close(new, old, rtol=0, atol=1e-3)


def test_loglik_head_runs_only_on_the_continuation_positions(smollm2_tokenizer):
    model = tiny_llama(0, **WIDE)
    records = load_task("piqa", limit=2)
    rows, handle = _head_rows(model)
    evaluate(model, smollm2_tokenizer, "piqa", records, "loglik", batch_size=4, progress=False)
    handle.remove()
    prompt_tokens = sum(
        len(smollm2_tokenizer(build_prompt(r, with_output=False))["input_ids"]) for r in records
    )
    assert 0 < sum(rows) < prompt_tokens  # the 4 choice texts, far fewer than the prompts' tokens
