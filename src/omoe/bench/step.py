"""One variant's training step, timed: forward (the trainer's loss), backward, AdamW."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from omoe.bench.variants import Result, Variant, old_autocast_dtype, wrap
from omoe.data.tokenize import IGNORE_INDEX
from omoe.layers.reference import use_before_representation
from omoe.models.logits import logits_only_at
from omoe.models.memory import saved_tensor_bytes
from omoe.models.precision import autocast, precision_name
from omoe.train.loop import token_loss_sum


def response_labels(ids: torch.Tensor, response: int) -> torch.Tensor:
    """Labels of a fine-tuning batch whose last ``response`` tokens per row are the response
    (``(B, T)``, -100 on the prompt), as the trainer's data has them."""
    labels = ids.clone()
    labels[:, : max(0, ids.shape[1] - response)] = IGNORE_INDEX
    return labels


def full_logits_loss_sum(model, labels: torch.Tensor, **inputs) -> torch.Tensor:
    """The trainer's loss as it was: every position's logits, then the masked cross-entropy."""
    logits = model(**inputs).logits  # (B, T, V)
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _loss(variant: Variant, wrapped, embeddings, ids, labels, trains: bool, amp_dtype) -> Callable:
    """The forward of one step of ``variant``: a function returning the mean loss per supervised token."""
    device = ids.device
    mask = torch.ones_like(ids)
    n_tokens = max(1, int((labels[:, 1:] != IGNORE_INDEX).sum()))

    def forward() -> torch.Tensor:
        with autocast(amp_dtype, device):
            if variant.full_logits:
                return full_logits_loss_sum(wrapped, labels, input_ids=ids, attention_mask=mask) / n_tokens
            if trains:
                return token_loss_sum(wrapped, ids, mask, labels) / n_tokens
            # Frozen base: backward through the whole network from the embeddings, the floor that
            # every adapter method pays.
            embeds = embeddings(ids).detach().requires_grad_(True)
            targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T)
            keep = targets != IGNORE_INDEX
            with logits_only_at(wrapped, keep):
                logits = wrapped(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits  # (M, V)
            return F.cross_entropy(logits.float(), targets[keep], reduction="sum") / n_tokens

    return forward


def _time_steps(
    step: Callable[[], None], steps: int, warmup: int, device
) -> tuple[list[float], float | None]:
    """Seconds of each of ``steps`` calls of ``step`` after ``warmup`` untimed ones, and on CUDA the
    allocator's peak MiB over the timed ones."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return times, peak


def bench_variant(
    variant: Variant, model, ids, labels, *, r, steps, warmup, amp_dtype
) -> tuple[Result, list]:
    """Time ``steps`` training steps of ``variant`` after ``warmup`` untimed ones; the step times too."""
    device = ids.device
    wrapped, unload = wrap(variant.adapter, model, r)
    if variant.before_representation:
        use_before_representation(wrapped)
    wrapped.train()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    amp_dtype = old_autocast_dtype(device) if variant.full_logits else amp_dtype
    forward = _loss(variant, wrapped, model.get_input_embeddings(), ids, labels, bool(params), amp_dtype)

    def step() -> None:
        forward().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    times, peak = _time_steps(step, steps, warmup, device)
    saved = saved_tensor_bytes(forward) / 2**20
    if opt is not None:
        opt.zero_grad(set_to_none=True)
        opt.state.clear()
    unload()
    for p in model.parameters():
        p.requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    median = statistics.median(times)
    result = Result(
        variant.name, precision_name(amp_dtype), "all" if variant.full_logits else "used",
        sum(p.numel() for p in params), median, min(times), ids.numel() / median, saved, peak,
    )  # fmt: skip
    return result, times
