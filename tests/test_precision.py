"""``precision``: which autocast a run uses (bf16 where the hardware has it natively, else fp32),
the CPU check and its fallback, and that training and evaluation record what they used."""

import pytest
import torch

from omoe.data import load_task
from omoe.errors import ConfigError
from omoe.eval import evaluate
from omoe.eval.run import EvalSpec
from omoe.models import precision
from omoe.models.testing import tiny_llama


def test_precision_auto_is_bf16_on_a_cpu_with_native_bf16_and_fp32_without(monkeypatch):
    monkeypatch.delenv(precision.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_flags_have_bf16", lambda: True)
    assert precision.autocast_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_flags_have_bf16", lambda: False)
    assert precision.autocast_dtype("auto", "cpu") is None  # the fallback
    assert precision.autocast_dtype("bf16", "cpu") == torch.bfloat16  # asked for explicitly
    assert precision.autocast_dtype("fp32", "cpu") is None
    with pytest.raises(ConfigError, match="precision fp16 needs CUDA"):
        precision.autocast_dtype("fp16", "cpu")
    monkeypatch.setenv(precision.CPU_BF16_ENV, "1")  # the override wins over the flags
    assert precision.autocast_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setenv(precision.CPU_BF16_ENV, "yes")
    with pytest.raises(ConfigError, match="OMOE_CPU_BF16='yes'; allowed: 0, 1"):
        precision.autocast_dtype("auto", "cpu")


def test_cpuinfo_flags_with_avx512_bf16_or_amx_bf16_mean_native_bf16():
    line = "flags\t\t: fpu vme sse2 avx2 avx512f avx512bw {}\nbogomips\t: 4800\n"
    assert precision.cpuinfo_has_bf16(line.format("avx512_bf16"))
    assert precision.cpuinfo_has_bf16(line.format("amx_tile amx_bf16"))
    assert not precision.cpuinfo_has_bf16(line.format("avx512_vnni"))  # AVX-512 alone emulates bf16
    assert not precision.cpuinfo_has_bf16("Features\t: fp asimd bf16\n")  # only x86 flags lines count


def test_evaluation_records_the_precision_it_used(smollm2_tokenizer, monkeypatch):
    records = load_task("boolq", limit=2)
    model = tiny_llama(0)
    monkeypatch.setenv(precision.CPU_BF16_ENV, "1")
    auto, _ = evaluate(model, smollm2_tokenizer, "boolq", records, "label", progress=False)
    fp32, _ = evaluate(model, smollm2_tokenizer, "boolq", records, "label", progress=False, precision="fp32")
    monkeypatch.setenv(precision.CPU_BF16_ENV, "0")
    fallback, _ = evaluate(model, smollm2_tokenizer, "boolq", records, "label", progress=False)
    assert (auto["precision"], fp32["precision"], fallback["precision"]) == ("bf16", "fp32", "fp32")


def test_eval_spec_refuses_fp16_on_cpu_and_unknown_precisions():
    with pytest.raises(
        ConfigError, match="--precision fp16 is not allowed on cpu; allowed: auto, fp32, bf16"
    ):
        EvalSpec(tasks="boolq", protocol="label", precision="fp16")
    with pytest.raises(ConfigError, match="--precision fp8 is not allowed"):
        EvalSpec(tasks="boolq", protocol="label", precision="fp8")
