"""PEFT interchange: omoe LoRA/DoRA adapters saved in PEFT's layout load in PEFT, and PEFT's load in omoe."""

import json

import pytest
import torch
from torch.testing import assert_close

from omoe import OMoEConfig, OMoEModel, get_omoe_model
from omoe.errors import AdapterLoadError, ConfigError
from omoe.models.testing import tiny_llama

peft = pytest.importorskip("peft")

VOCAB = 128
IDS = torch.arange(3, 27).view(2, 12)


def _trained(config: OMoEConfig) -> OMoEModel:
    """An adapter with non-zero B (and moved magnitudes): equality with the base would prove nothing."""
    torch.manual_seed(0)
    model = get_omoe_model(tiny_llama(0, vocab_size=VOCAB), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits


CASES = {
    "lora": dict(method="lora", r=4, alpha=8),
    "dora": dict(method="dora", r=4, alpha=16, dropout=0.1),
    "lora-some-targets-and-blocks": dict(
        method="lora", r=2, target_modules=["q_proj", "down_proj"], layers=[1]
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_peft_format_loads_in_peft_with_the_same_logits(tmp_path, case):
    ours = _trained(OMoEConfig(**CASES[case]))
    ours.save_pretrained(tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(0, vocab_size=VOCAB), tmp_path).eval()
    assert isinstance(theirs, peft.PeftModelForCausalLM)
    base_logits = _logits(tiny_llama(0, vocab_size=VOCAB))
    assert not torch.allclose(_logits(ours), base_logits, atol=1e-3)  # the adapter does change the output
    assert_close(_logits(theirs), _logits(ours), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_adapter_loads_into_omoe_with_the_same_logits(tmp_path, use_dora):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                             use_dora=use_dora, layers_to_transform=[0], task_type="CAUSAL_LM")  # fmt: skip
    theirs = peft.get_peft_model(tiny_llama(0, vocab_size=VOCAB), config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(tmp_path)
    ours = OMoEModel.from_pretrained(tiny_llama(0, vocab_size=VOCAB), tmp_path)
    assert ours.omoe_config.method == ("dora" if use_dora else "lora") and ours.omoe_config.layers == [0]
    assert_close(_logits(ours), _logits(theirs.eval()), rtol=1e-5, atol=1e-5)
    # and back: omoe's own format of the same adapter reloads bit for bit
    ours.save_pretrained(tmp_path / "omoe")
    assert torch.equal(_logits(OMoEModel.from_pretrained(tiny_llama(0, vocab_size=VOCAB), tmp_path / "omoe")),
                       _logits(ours))  # fmt: skip


@pytest.mark.parametrize("method", ["moe", "omoe"])
def test_mixtures_are_refused_for_the_peft_format_and_nothing_is_written(tmp_path, method):
    model = get_omoe_model(tiny_llama(0, vocab_size=VOCAB), OMoEConfig(method=method))
    with pytest.raises(ConfigError, match="PeftType enum") as err:
        model.save_pretrained(tmp_path / "out", format="peft")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_unknown_format_is_refused():
    model = get_omoe_model(tiny_llama(0, vocab_size=VOCAB), OMoEConfig(method="lora"))
    with pytest.raises(ConfigError, match="allowed: omoe, peft"):
        model.save_pretrained("unused", format="gguf")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_rslora": True}, "use_rslora=True is not supported"),
        ({"bias": "all"}, "bias='all' is not supported"),
        ({"peft_type": "IA3"}, "PEFT adapter type 'IA3' is not loadable"),
        ({"target_modules": "all-linear"}, "target_modules='all-linear'"),
    ],
)
def test_peft_adapters_omoe_cannot_represent_are_refused_with_the_reason(tmp_path, change, message):
    _trained(OMoEConfig(method="lora", r=2)).save_pretrained(tmp_path, format="peft")
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(AdapterLoadError, match=message):
        OMoEModel.from_pretrained(tiny_llama(0, vocab_size=VOCAB), tmp_path)
