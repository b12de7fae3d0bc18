"""Tiny random models for tests: SmolLM2's architecture family and vocabulary, about 3 M weights."""

from __future__ import annotations

import torch

SMOLLM2_VOCAB_SIZE = 49152


def tiny_llama(seed: int = 0, **overrides):
    """Build a small random ``LlamaForCausalLM`` in eval mode, deterministic for a given ``seed``.

    Defaults: hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads, the SmolLM2 vocabulary
    (49,152, so the real SmolLM2 tokenizer can drive it) and SmolLM2's special-token ids
    (bos 1, eos 2, pad 2). Any ``LlamaConfig`` field can be overridden, e.g. ``vocab_size=128``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {
        "vocab_size": SMOLLM2_VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    fields.update(overrides)
    config = LlamaConfig(**fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()
