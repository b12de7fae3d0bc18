"""Random models of the shapes in :mod:`omoe.models.shapes`: tiny ones for tests, large ones for benchmarks."""

from __future__ import annotations

import torch

from omoe.models.shapes import PRESETS, SHAPES, SMOLLM2_VOCAB_SIZE

__all__ = ["SMOLLM2_VOCAB_SIZE", "bench_device", "random_llama", "tiny_llama"]


def tiny_llama(seed: int = 0, **overrides):
    """Build a small random ``LlamaForCausalLM`` in eval mode, deterministic for a given ``seed``.

    Defaults: the ``tiny`` shape (hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads, the
    SmolLM2 vocabulary, 49,152, so the real SmolLM2 tokenizer can drive it) and SmolLM2's
    special-token ids (bos 1, eos 2, pad 2). Any ``LlamaConfig`` field can be overridden, e.g.
    ``vocab_size=128``.
    """
    from transformers import LlamaForCausalLM  # seconds to import: only when used

    fields = {"max_position_embeddings": 1024, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    config = SHAPES["tiny"].llama_config(**fields | overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def bench_device(device=None) -> tuple[torch.device, torch.dtype]:
    """The device (default: CUDA when available) and weight dtype (bf16 on CUDA, fp32 on CPU)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        # Denormal floats (e.g. from SiLU's tails) make CPU arithmetic several times slower; the
        # flag applies to every variant alike. The train/eval commands set it too.
        torch.set_flush_denormal(True)
    return device, (torch.bfloat16 if device.type == "cuda" else torch.float32)


def random_llama(preset: str, device=None, layers: int | None = None, seed: int = 0):
    """A frozen random ``LlamaForCausalLM`` of a benchmark preset's shape (:data:`PRESETS`;
    ``layers`` blocks if given): bf16 on CUDA, fp32 on CPU.

    Returns ``(model, LlamaConfig fields, device, dtype)``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = PRESETS[preset].shape.fields(num_hidden_layers=layers)
    device, dtype = bench_device(device)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**spec, dtype=dtype)).to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, spec, device, dtype
