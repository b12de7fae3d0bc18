"""The pieces of an optimizer step, apart from the :class:`~omoe.train.trainer.Trainer` that runs them:
the loss, the optimizer and its lr schedule, the dropout seeds, what makes a step unusable.

One optimizer step sees one global batch (``optim.global_batch_size`` examples over all processes).
Its loss is the mean token cross-entropy over the whole global batch: each micro-batch's summed
token loss (:func:`token_loss_sum`) is divided by the global batch's token count, known in advance
on every process, so the gradient does not depend on how the batch is split into micro-batches or
processes. With ``router_aux_loss_coef`` > 0 the mean over micro-batches of the router's
load-balancing loss, times the coefficient, is added (the ``aux_loss`` column logs that mean
whatever the coefficient).

Logits are computed only at the supervised positions, never as the full ``(B, T, vocab)`` tensor:
for a short response after a long prompt that is most of the LM head's cost saved, in forward and
backward.

Dropout masks are drawn after seeding torch with :func:`micro_seed` ``(seed, step, micro-batch
number)``, so they do not depend on the number of processes or on where a run was resumed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from omoe.data.tokenize import IGNORE_INDEX
from omoe.models.logits import selected_logits
from omoe.optim import OrthogonalExpertOptimizer
from omoe.train.config import OptimConfig


def token_loss_sum(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
    """Summed next-token cross-entropy (float32 scalar) over the positions whose label is not -100.

    Args:
        input_ids, attention_mask, labels: ``(B, T)``; ``labels[b, t]`` is the target of position
            ``t - 1`` (Hugging Face's convention), -100 where nothing is learned.

    The LM head runs on those positions only: the result equals the cross-entropy of the full
    ``(B, T, vocab)`` logits up to float rounding (see the tests).
    """
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T): logits at t predict token t+1
    keep = targets != IGNORE_INDEX  # (B, T)
    logits = selected_logits(model, input_ids, attention_mask, keep)  # (M, V), M = keep.sum()
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based).

    Linear warmup reaches the peak at step ``warmup - 1`` (the first step already moves), then
    ``linear``/``cosine`` decay towards 0 at step ``total``; ``constant`` stays at the peak.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def build_optimizer(model, params: list, o: OptimConfig, total: int):
    """AdamW over ``params`` (inside the orthogonal expert optimizer when ``o.optimizer`` says so)
    and its :func:`lr_factor` schedule over ``total`` steps; returns ``(optimizer, scheduler)``."""
    warmup = o.warmup_for(total)
    betas = (o.adam_beta1, o.adam_beta2)
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=betas, eps=o.adam_eps, weight_decay=o.weight_decay)
    if o.optimizer == "orthogonal":
        optimizer = OrthogonalExpertOptimizer(model, optimizer, o.orthogonal)

    def factor(step: int) -> float:  # a plain function: LambdaLR's state_dict stores nothing of it
        return lr_factor(step, warmup, total, o.schedule)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def non_finite_step(loss: float, grad_norm: float, grad_scaling: bool) -> str | None:
    """What makes an optimizer step unusable, or None. Under fp16 grad scaling an infinite or NaN
    gradient norm is the scaler's overflow signal: it skips that step and lowers its scale, so it
    is not an error; a non-finite loss always is."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if not math.isfinite(grad_norm) and not grad_scaling:
        return f"the gradient norm is {grad_norm} (the loss was {loss:.4f})"
    return None


def micro_seed(seed: int, step: int, micro: int) -> int:
    """The torch seed set before micro-batch ``micro`` of optimizer step ``step`` (its dropout masks)."""
    return ((seed * 1_000_003 + step) * 1_009 + micro) % (2**63)
