"""One registry of methods, topologies and routings (omoe.registry): every name it lists is
accepted by OMoEConfig and implemented by the injection or the router, and the layers call the
variants (LoRA/DoRA experts, plain/orthogonal mixers) without asking which one they hold."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from omoe import OMoEConfig, get_omoe_model
from omoe.errors import ConfigError
from omoe.layers import DoRAExperts, LoRAExperts, OrthogonalMixer, Router
from omoe.models.testing import tiny_llama
from omoe.registry import METHODS, ROUTINGS, TOPOLOGIES
from omoe.tuners.injection import INJECT_TOPOLOGY

LAYERS = Path(__file__).resolve().parents[1] / "src" / "omoe" / "layers"


@pytest.mark.parametrize("name", METHODS)
def test_every_method_builds_the_parts_its_registry_entry_names(name):
    spec = METHODS[name]
    config = OMoEConfig(method=name)
    model = get_omoe_model(tiny_llama(0, vocab_size=64), config)
    experts = [m for m in model.modules() if isinstance(m, LoRAExperts)]
    assert config.is_moe == spec.mixture == bool(model.moe_layers())
    assert experts and all(isinstance(e, DoRAExperts) == spec.dora for e in experts)
    mixers = [layer.mixer for layer in model.moe_layers().values()]
    assert all(isinstance(m, OrthogonalMixer) == spec.orthogonal for m in mixers)


def test_every_topology_has_an_injector_and_every_injector_a_name():
    assert set(INJECT_TOPOLOGY) == set(TOPOLOGIES)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_every_routing_is_accepted_by_the_config_and_implemented_by_the_router(routing):
    config = OMoEConfig(num_experts=3, routing=routing, top_k=2 if routing == "topk" else None)
    router = Router(8, 3, config.routing, config.top_k)
    weights = router(torch.randn(5, 8)).weights  # (S, N)
    assert weights.shape == (config.top_k or 3, 5)
    if routing != "switch":  # switch keeps the raw top-1 probability, below 1
        torch.testing.assert_close(weights.sum(0), torch.ones(5))


@pytest.mark.parametrize(
    "field,value,names",
    [("method", "qlora", METHODS), ("topology", "attn", TOPOLOGIES), ("routing", "hash", ROUTINGS)],
)
def test_an_unknown_name_is_refused_listing_the_registry(field, value, names):
    with pytest.raises(ConfigError, match=re.escape(f"allowed: {', '.join(names)}")):
        OMoEConfig(**{field: value})


@pytest.mark.parametrize("file", ["linear.py", "moe.py"])
def test_the_adapter_layers_never_ask_which_variant_or_mixer_they_hold(file):
    text = (LAYERS / file).read_text()
    assert not re.findall(r"\.is_dora\b|\.orthogonal\b|isinstance\([^)]*(DoRA|Orthogonal)", text)
