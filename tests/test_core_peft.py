"""Our LoRA and DoRA compute what HF PEFT computes on the same weights (PEFT is test-only)."""

import copy

import pytest
import torch
from torch.testing import assert_close

from omoe import OMoEConfig, get_omoe_model
from omoe.models.testing import tiny_llama

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_and_dora_outputs_and_gradients_equal_peft(use_dora):
    base = tiny_llama(seed=0, vocab_size=128, num_hidden_layers=2).double()
    ours = get_omoe_model(
        copy.deepcopy(base), OMoEConfig(method="dora" if use_dora else "lora", r=4, alpha=8, dropout=0.0)
    )
    ours.double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, use_dora=use_dora),
    ).double()
    theirs_params = dict(theirs.named_parameters())
    mapping = {}
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if not p.requires_grad:
                continue
            module = name.removeprefix("base_model.").split(".omoe_lora.")[0]
            kind = name.rsplit(".", 1)[-1]
            peft_name = {
                "lora_A": f"base_model.model.{module}.lora_A.default.weight",
                "lora_B": f"base_model.model.{module}.lora_B.default.weight",
                "lora_magnitude": f"base_model.model.{module}.lora_magnitude_vector.default.weight",
            }[kind]
            theirs_params[peft_name].copy_(p[0])
            mapping[name] = peft_name
    assert len(mapping) == sum(1 for n, p in theirs.named_parameters() if p.requires_grad)

    ids = torch.randint(3, 128, (2, 7), generator=g)
    ours.train()
    theirs.train()
    out_ours = ours(input_ids=ids, labels=ids)
    out_theirs = theirs(input_ids=ids, labels=ids)
    assert_close(out_ours.logits, out_theirs.logits, atol=1e-10, rtol=1e-10)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    ours_params = dict(ours.named_parameters())
    for name, peft_name in mapping.items():
        assert_close(ours_params[name].grad[0], theirs_params[peft_name].grad, atol=1e-10, rtol=1e-8)
