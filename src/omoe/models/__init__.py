"""Model loading: built-in GGUF models (cached as HF directories), local HF directories, test models."""

from omoe.models.loading import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    cache_dir,
    load_model,
    load_tokenizer,
    resolve_model,
)

__all__ = ["BUILTIN_MODELS", "DEFAULT_MODEL", "cache_dir", "load_model", "load_tokenizer", "resolve_model"]
