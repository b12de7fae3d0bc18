"""Run a task's test prompts through an adapted model and keep the experts' representations.

The prompts are read in file order and batched (right-padded); within
``model.capture_representations(all_experts=True)`` every MoE layer records its
:class:`~omoe.layers.ExpertCapture`, of which the real (unpadded) tokens are kept for the chosen
layers, until at least ``tokens`` tokens have been seen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from omoe.data.prompts import build_prompt
from omoe.errors import ConfigError
from omoe.eval.batching import model_device, pad, progress_bar

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


@dataclass
class LayerRecord:
    """Representations of one MoE layer over the analysed tokens (concatenated over batches)."""

    name: str
    block: int
    num_experts: int
    orthogonal: bool
    all_raw: list[torch.Tensor] = field(default_factory=list)  # (E, n, d) per batch
    mixed: list[torch.Tensor] = field(default_factory=list)  # (S, n, d)
    indices: list[torch.Tensor] = field(default_factory=list)  # (S, n), top-k only
    weights: list[torch.Tensor] = field(default_factory=list)  # (S, n)
    entropy_sum: float = 0.0  # router softmax entropy, summed over tokens
    load_sum: torch.Tensor | None = None  # (E,) routing weight per expert, summed over tokens
    fraction_sum: torch.Tensor | None = None  # (E,) share of assignments, summed over tokens
    tokens: int = 0

    def cat(self, parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor | None:
        return torch.cat(parts, dim=dim) if parts else None


def block_of(name: str) -> int | None:
    """Transformer block index in a module name such as ``model.layers.14.mlp``."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def moe_blocks(model) -> dict[int, list[str]]:
    """``{block: [MoE layer names]}`` of an ``OMoEModel``."""
    out: dict[int, list[str]] = {}
    for name in model.moe_layers():
        block = block_of(name)
        if block is not None:
            out.setdefault(block, []).append(name)
    return dict(sorted(out.items()))


def choose_layers(model, blocks: list[int] | None) -> list[str]:
    """The MoE layers of the requested blocks (default: first, middle and last MoE block)."""
    available = moe_blocks(model)
    if not available:
        raise ConfigError(
            "the adapter has no MoE layers (methods moe and omoe have experts; lora and dora do not)"
        )
    keys = list(available)
    if blocks is None:
        blocks = sorted({keys[0], keys[len(keys) // 2], keys[-1]})
    missing = [b for b in blocks if b not in available]
    if missing:
        raise ConfigError(f"--layers {','.join(map(str, missing))}: no MoE layer in that block; blocks with "
                          f"MoE layers: {_ranges(keys)}")  # fmt: skip
    return [name for b in blocks for name in available[b]]


def collect(model, tokenizer, records: list[dict], layer_names: list[str], tokens: int, batch_size: int = 8,
            max_prompt_tokens: int = 512, progress: bool = True) -> dict[str, LayerRecord]:  # fmt: skip
    """Run prompts until ``tokens`` real tokens have passed; return the chosen layers' records."""
    layers = model.moe_layers()
    out = {}
    for name in layer_names:
        layer = layers[name]
        out[name] = LayerRecord(name, block_of(name), layer.omoe_router.num_experts, layer.mixer.orthogonal)
    prompts = [
        tokenizer(build_prompt(r, with_output=False))["input_ids"][:max_prompt_tokens] for r in records
    ]
    seen, count = 0, 0
    while seen < tokens and count < len(prompts):  # whole prompts until `tokens` are reached
        seen += len(prompts[count])
        count += 1
    batches = [prompts[i : min(i + batch_size, count)] for i in range(0, count, batch_size)]
    if seen < tokens:
        raise ConfigError(f"the task's prompts hold only {seen} tokens; ask for --tokens {seen} or fewer")
    device = model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()
    with torch.inference_mode(), model.capture_representations(all_experts=True):
        for batch in progress_bar(batches, "analyse", progress):
            ids, mask = pad(batch, pad_id, side="right")  # (B, T) each
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
            captures, stats = model.expert_representations(), model.router_stats()
            real = mask.reshape(-1).bool()  # (B*T,)
            for name, rec in out.items():
                cap = captures[name]
                keep = real.to(cap.raw.device) if cap.mask is None else cap.mask
                n = int(keep.sum())
                all_raw = cap.all_raw if cap.all_raw is not None else cap.raw
                rec.all_raw.append(all_raw[:, keep].float().cpu())
                rec.mixed.append(cap.mixed[:, keep].float().cpu())
                rec.weights.append(cap.weights[:, keep].float().cpu())
                if cap.indices is not None:
                    rec.indices.append(cap.indices[:, keep].cpu())
                s = stats[name]
                rec.entropy_sum += float(s.entropy) * n
                load, frac = s.load.float().cpu() * n, s.token_fraction.float().cpu() * n
                rec.load_sum = load if rec.load_sum is None else rec.load_sum + load
                rec.fraction_sum = frac if rec.fraction_sum is None else rec.fraction_sum + frac
                rec.tokens += n
    return out


def _ranges(blocks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5``."""
    parts, start = [], None
    for i, b in enumerate(blocks):
        if start is None:
            start = b
        if i + 1 == len(blocks) or blocks[i + 1] != b + 1:
            parts.append(str(start) if start == b else f"{start}-{b}")
            start = None
    return ", ".join(parts)
