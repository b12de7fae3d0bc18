"""What ``omoe bench`` measures: its rows (variants), the adapter each injects, and a row's result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from omoe import OMoEConfig, get_omoe_model
from omoe.models.precision import autocast_dtype

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Variant:
    """A row of the training benchmark: which adapter, and whether it runs the step of before."""

    name: str
    adapter: str  # base | lora | peft-lora | omoe
    # All (B, T, vocab) logits, the old precision and the reference kernels (aten::bernoulli_
    # dropout, unfused hidden and Gram-Schmidt, both recomputed in backward; layers/kernels.py).
    full_logits: bool = False
    before_representation: bool = False  # E_s = down(h_s) - down(h0), as before issue 9


VARIANTS = {
    v.name: v
    for v in (
        Variant("base", "base"),
        Variant("lora", "lora"),
        Variant("peft-lora", "peft-lora"),
        Variant("omoe", "omoe"),
        # The step as it was when issue 10 was filed (issue 9's representation came later).
        Variant("omoe-full-logits", "omoe", full_logits=True, before_representation=True),
        Variant("omoe-repr-before", "omoe", before_representation=True),
    )
}
BASELINE = "omoe-full-logits"


@dataclass
class Result:
    variant: str
    precision: str
    logits: str  # "all" or "used"
    trainable: int
    step_s: float  # median over rounds of the median over timed steps
    step_s_min: float  # fastest timed step
    tokens_per_s: float
    saved_mib: float
    peak_mib: float | None


@dataclass
class EvalResult:
    variant: str  # label-before | label-now
    precision: str
    logits: str
    seconds: float  # median over rounds
    seconds_min: float
    prompts_per_s: float


def old_autocast_dtype(device: torch.device) -> torch.dtype | None:
    """What ``precision: auto`` meant before issue 10: autocast on CUDA only."""
    return autocast_dtype("auto", device) if device.type == "cuda" else None


def wrap(adapter: str, model: nn.Module, r: int) -> tuple[nn.Module, Callable[[], nn.Module]]:
    """Inject ``adapter`` into ``model``; return the wrapped model and a function that unloads it."""
    if adapter == "base":
        return model, lambda: model
    if adapter == "peft-lora":
        import peft

        wrapped = peft.get_peft_model(
            model, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=ALL_TARGETS)
        )
        return wrapped, wrapped.unload
    config = (
        OMoEConfig(method="lora", r=r, alpha=2 * r) if adapter == "lora" else OMoEConfig(r=r, alpha=2 * r)
    )
    wrapped = get_omoe_model(model, config)
    return wrapped, wrapped.unload
