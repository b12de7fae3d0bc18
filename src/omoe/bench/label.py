"""The label protocol's evaluation of the default OMoE, timed as it was and as it is."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

from omoe.bench.variants import old_autocast_dtype, wrap
from omoe.eval.batching import length_sorted_batches, pad
from omoe.eval.label import next_token_scores
from omoe.layers.kernels import reference_kernels
from omoe.layers.reference import before_representation
from omoe.models.precision import autocast


def bench_label_eval(model, prompts, *, batch_size, r, amp_dtype) -> dict[str, float]:
    """Seconds to score ``prompts`` with the label protocol on the default OMoE: as it was when
    issue 10 was filed (full logits, the old precision, the reference kernels and the representation
    before issue 9) and as it is (last-position logits, ``amp_dtype``)."""
    device = next(model.parameters()).device
    wrapped, unload = wrap("omoe", model, r)
    wrapped.eval()
    label_ids = [5, 6, 7, 8]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def before() -> None:  # the protocol's loop as it was (run with the layer as it was)
        for batch in length_sorted_batches([len(p) for p in prompts], batch_size):
            input_ids, attention_mask = pad([prompts[i] for i in batch], 0, side="right")
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            logits = wrapped(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
            last = attention_mask.sum(1) - 1
            logits[torch.arange(len(batch), device=device), last][:, label_ids].float().cpu()

    def now() -> None:
        next_token_scores(wrapped, prompts, label_ids, 0, batch_size)

    @contextmanager
    def as_filed() -> Iterator[None]:  # the layer and kernels of when issue 10 was filed
        with reference_kernels(), before_representation(wrapped):
            yield

    runs = {
        "label-before": (before, old_autocast_dtype(device), as_filed),
        "label-now": (now, amp_dtype, nullcontext),
    }
    seconds = {}
    try:
        with torch.inference_mode():
            for name, (fn, dtype, kernels) in runs.items():
                with kernels(), autocast(dtype, device):
                    fn()  # warm-up
                    sync()
                    t0 = time.perf_counter()
                    fn()
                    sync()
                seconds[name] = time.perf_counter() - t0
    finally:
        unload()
    return seconds
