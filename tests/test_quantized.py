"""Adapters on a bitsandbytes-quantized base (NF4 4-bit, LLM.int8 8-bit), on its CPU backend.

bitsandbytes (0.50) quantizes and multiplies on CPU as on CUDA (the same NF4 / int8 formats), so
these tests run in CI; scripts/gpu_check.sh is where the CUDA kernels would be exercised.
"""

import pytest
import torch
from torch.testing import assert_close

from omoe import OMoEConfig, get_omoe_model
from omoe.errors import ConfigError
from omoe.layers.quantized import frozen_weight, keep_4bit_trainable, quantization_of
from omoe.models.testing import tiny_llama

pytest.importorskip("bitsandbytes")

VOCAB = 128
IDS = torch.arange(3, 27).view(2, 12)
METHODS = ["lora", "dora", "moe", "omoe"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-128")
    tiny_llama(0, vocab_size=VOCAB).save_pretrained(path)
    return path


def _quantized(base_dir, bits, as_omoe_runs_it=True):
    """The tiny LLaMA loaded quantized by transformers; by default with its 4-bit layers kept on
    the trainable kernels, as an OMoEModel keeps them (see the last test)."""
    from transformers import AutoModelForCausalLM

    from omoe.models.quantize import bnb_config

    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=bnb_config(bits), device_map={"": "cpu"}
    )
    if as_omoe_runs_it:
        keep_4bit_trainable(model)
    return model.eval()


def _adapted(base, method, **config):
    torch.manual_seed(0)
    model = get_omoe_model(base, OMoEConfig(method=method, dropout=0.0, **config))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_the_base_is_quantized_except_the_lm_head(base_dir, bits):
    model = _quantized(base_dir, bits)
    mlp = model.model.layers[0].mlp
    assert {quantization_of(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)} == {bits}
    assert quantization_of(model.lm_head) is None
    reference = tiny_llama(0, vocab_size=VOCAB).model.layers[0].mlp.down_proj.weight
    error = (frozen_weight(mlp.down_proj).float() - reference).abs().max()
    assert 0 < error < (0.2 if bits == "4bit" else 0.02) * reference.abs().max()


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
@pytest.mark.parametrize("method", METHODS)
def test_untrained_adapter_on_a_quantized_base_is_that_base_bit_for_bit(base_dir, bits, method):
    base = _quantized(base_dir, bits)
    want = _logits(base)
    torch.manual_seed(0)
    assert torch.equal(_logits(get_omoe_model(base, OMoEConfig(method=method)).eval()), want)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
@pytest.mark.parametrize("method", METHODS)
def test_adapter_outputs_follow_the_fp32_reference_within_the_quantization_error(base_dir, bits, method):
    """The same adapter weights on the quantized base and on the fp32 base: their outputs differ by
    about what the two bases differ by (the quantization error), far less than the adapter's effect."""
    quantized, reference = _quantized(base_dir, bits), tiny_llama(0, vocab_size=VOCAB).eval()
    base_error = (_logits(quantized) - _logits(reference)).abs().max()
    ref_base = _logits(reference)
    adapted_q, adapted_ref = _logits(_adapted(quantized, method)), _logits(_adapted(reference, method))
    effect = (adapted_ref - ref_base).abs().max()
    assert base_error > 0 and effect > 10 * base_error  # the comparison below can tell them apart
    assert (adapted_q - adapted_ref).abs().max() < 3 * base_error


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
@pytest.mark.parametrize("method", METHODS)
def test_training_steps_on_a_quantized_base_lower_the_loss_and_leave_it_frozen(base_dir, bits, method):
    model = _adapted(_quantized(base_dir, bits), method, num_experts=2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_merging_into_a_quantized_weight_is_refused(base_dir):
    model = _adapted(_quantized(base_dir, "4bit"), "lora")
    with pytest.raises(ConfigError, match="cannot merge into a 4bit-quantized frozen weight"):
        model.merge_and_unload()


def test_dora_norms_come_from_the_dequantized_weight(base_dir):
    """DoRA's ||W0|| on a quantized linear is the norm of the weight the layer applies."""
    model = _adapted(_quantized(base_dir, "4bit"), "dora")
    layer = model.base_model.model.layers[0].self_attn.q_proj
    w0 = frozen_weight(layer.base_layer).float()
    assert_close(layer.omoe_lora.norm_ref, w0.norm(dim=1))
    delta = layer.omoe_lora.delta_weight()[0]  # (out, in)
    assert_close(
        layer.omoe_lora.weight_norm(layer.base_layer)[0], (w0 + delta).norm(dim=1), rtol=1e-5, atol=1e-6
    )


def test_omoe_train_with_quantization_4bit_trains_and_saves_a_loadable_adapter(
    tmp_path, tiny_model_dir, smollm2_tokenizer
):
    from omoe import OMoEModel
    from omoe.models import load_model
    from omoe.train import train
    from omoe.train.config import load_config
    from test_train import TINY  # the training test's tiny run: boolq, 4 steps of 4 records, cutoff 32

    settings = {
        **TINY,
        "model": str(tiny_model_dir),
        "quantization": "4bit",
        "output_dir": str(tmp_path / "run"),
    }
    settings["precision"] = "fp32"
    result = train(load_config(None, settings))
    assert quantization_of(result.model.base_model.model.layers[0].mlp.base_layer.up_proj) == "4bit"
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    base, _ = load_model(tiny_model_dir, quantization="4bit")
    loaded = OMoEModel.from_pretrained(base, tmp_path / "run")
    assert torch.equal(_logits(loaded)[..., :VOCAB], _logits(result.model)[..., :VOCAB])


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"quantization": "3bit"}, "allowed: none, 8bit, 4bit"),
        ({"quantization": "4bit", "fsdp": True}, "fsdp"),
    ],
)
def test_bad_quantization_settings_are_refused(settings, message):
    from omoe.train.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, settings)


@pytest.mark.parametrize("when", ["before wrapping", "after wrapping"])
def test_an_inference_pass_does_not_break_the_4bit_gradients(base_dir, when):
    """bitsandbytes' CPU backend (on AVX512-BF16 CPUs) repacks a 4-bit weight for a forward-only
    kernel the first time the layer runs in eval mode without grad, and then backpropagates through
    that kernel without autograd; an OMoEModel keeps its 4-bit weights out of that path."""
    grads = []
    for warm in (False, True):
        base = _quantized(base_dir, "4bit", as_omoe_runs_it=False)
        if warm and when == "before wrapping":
            _logits(base)
        model = _adapted(base, "omoe")
        if warm and when == "after wrapping":
            _logits(model)
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        if when == "after wrapping":
            assert_close(grads[1][name], grads[0][name], msg=name)
        else:  # undoing a repacked weight re-quantizes its double-quantized absmax: weights move by ~1e-4
            # (without keep_4bit_trainable the gradients are up to 22% off on this model)
            assert (grads[1][name] - grads[0][name]).norm() < 1e-2 * grads[0][name].norm(), name
