"""Model shapes: one table of the LLaMA-family shapes that the benchmarks, ``omoe params``, the
profiling scripts and the tests build (random weights, or none on the ``meta`` device)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from omoe.errors import ConfigError

SMOLLM2_VOCAB_SIZE = 49152


@dataclass(frozen=True)
class Shape:
    """The ``LlamaConfig`` fields that fix a model's parameter count and compute."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False

    def fields(self, **overrides) -> dict:
        """The shape as ``LlamaConfig`` keyword arguments, with ``overrides`` (``None`` keeps a field)."""
        return asdict(self) | {k: v for k, v in overrides.items() if v is not None}

    def llama_config(self, **overrides):
        """The ``LlamaConfig`` of this shape, with ``overrides``."""
        from transformers import LlamaConfig  # transformers takes seconds to import: only when used

        return LlamaConfig(**self.fields(**overrides))

    def replace(self, **changes) -> Shape:
        return replace(self, **changes)


SHAPES = {
    # The tests' tiny LLaMA (omoe.models.testing.tiny_llama): SmolLM2's family and vocabulary, ~3 M weights.
    "tiny": Shape(64, 128, 2, 4, 2, SMOLLM2_VOCAB_SIZE, tie_word_embeddings=True),
    # A LLaMA small enough for 2 CPU cores; the same family and layout as LLaMA-2.
    "cpu-small": Shape(512, 1376, 4, 8, 8, 32000),
    # The bundled SmolLM2-135M-Instruct.
    "smollm2-135m": Shape(576, 1536, 30, 9, 3, SMOLLM2_VOCAB_SIZE, tie_word_embeddings=True),
    # The paper's base models and two neighbours.
    "llama2-7b": Shape(4096, 11008, 32, 32, 32, 32000),
    "llama2-13b": Shape(5120, 13824, 40, 40, 40, 32000),
    "llama2-70b": Shape(8192, 28672, 80, 64, 8, 32000),
    "llama3-8b": Shape(4096, 14336, 32, 32, 8, 128256),
}  # fmt: skip




@dataclass(frozen=True)
class Preset:
    """A benchmark's model (``omoe bench --preset``): a shape and its batch of ``batch`` x ``seq`` tokens."""

    shape: Shape
    batch: int
    seq: int


PRESETS = {
    "cpu-small": Preset(SHAPES["cpu-small"], batch=4, seq=256),
    # For tests of the benchmarks themselves: seconds, numbers meaningless.
    "tiny": Preset(SHAPES["tiny"].replace(vocab_size=1000, tie_word_embeddings=False), batch=2, seq=32),
    # Untied embeddings (unlike SmolLM2's own), as the benchmarks have measured it since they began.
    "smollm2-135m": Preset(SHAPES["smollm2-135m"].replace(tie_word_embeddings=False), batch=8, seq=128),
    # Random bf16 weights on a GPU.
    "llama2-7b": Preset(SHAPES["llama2-7b"], batch=4, seq=512),
}


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise ConfigError(f"unknown shape {name!r}; allowed: {', '.join(SHAPES)}")
    return SHAPES[name]
