"""Padding and batching helpers shared by the evaluation protocols."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from omoe.errors import NonFiniteError


def model_device(model) -> torch.device:
    """Device of a model or of a wrapper around one (first parameter's device)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), to waste little padding.

    Predictions do not depend on the grouping: every protocol is batch-invariant (see the tests).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def pad(sequences: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists to one length.

    Returns:
        ``input_ids`` and ``attention_mask``, LongTensors of shape ``(B, T)``. ``side="left"`` puts the
        padding before the tokens (for generation), ``"right"`` after them (for scoring).
    """
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(sequences), longest, dtype=torch.long)  # (B, T)
    for i, seq in enumerate(sequences):
        span = slice(longest - len(seq), longest) if side == "left" else slice(0, len(seq))
        ids[i, span] = torch.tensor(seq, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def progress_bar(batches: list, desc: str, enabled: bool):
    """A tqdm bar over batches, on stderr; ``enabled=False`` returns the list unchanged."""
    return tqdm(batches, desc=desc, unit="batch", leave=False, dynamic_ncols=True) if enabled else batches


def require_finite(task: str, index: int, what: str, values: dict[str, float]) -> None:
    """Stop with one line naming the task and the record when a score is NaN or infinite: an argmax
    over NaN picks a label that nothing chose, so no prediction is made from it."""
    if all(math.isfinite(v) for v in values.values()):
        return
    shown = ", ".join(f"{k} {v}" for k, v in values.items())
    raise NonFiniteError(
        f"{task} record {index}: {what} {shown}; no prediction is made from a NaN or infinite score "
        "(check the adapter, or evaluate with --precision fp32)"
    )
