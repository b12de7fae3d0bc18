"""Find the target modules of a causal LM and replace them by adapter layers.

A method (an entry of :data:`omoe.registry.METHODS`) becomes an injector object: a single adapter
per linear (LoRA/DoRA), or a mixture of experts (vanilla MoE-LoRA / OMoE) laid out by a topology
(``INJECT_TOPOLOGY``, one function per name of :data:`omoe.registry.TOPOLOGIES`). The experts'
variant (LoRA or DoRA) and the mixer (plain or orthogonal) are objects that the layers call
alike. Nothing here branches on a method's name.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from omoe.config import OMoEConfig, check_layers_in_range
from omoe.errors import TargetNotFoundError
from omoe.layers import (
    AdapterLinear,
    DoRAExperts,
    ExpertMixer,
    LoRAExperts,
    MoEFeedForward,
    MoELinear,
    OrthogonalMixer,
    Router,
    TokenMask,
)
from omoe.registry import METHODS, Method

FFN_PROJECTIONS = ("gate", "up", "down")  # attribute f"{p}_proj" of a gated (LLaMA-family) MLP


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def gated_mlps(model: nn.Module) -> dict[str, nn.Module]:
    """MLPs of the LLaMA family, found by structure: gate/up/down linears and an ``act_fn``."""
    return {
        name: m
        for name, m in model.named_modules()
        if all(isinstance(getattr(m, f"{p}_proj", None), nn.Linear) for p in FFN_PROJECTIONS)
        and callable(getattr(m, "act_fn", None))
    }


def block_index(name: str) -> int:
    """Index of the transformer block that holds module ``name`` (first integer component)."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    if match is None:
        raise TargetNotFoundError(
            f"cannot tell which block {name!r} belongs to (no numeric index in its name)"
        )
    return int(match.group(1))


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _available(names) -> str:
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    return ", ".join(suffixes) if suffixes else "(none)"


def resolve_targets(model: nn.Module, config: OMoEConfig) -> dict[str, nn.Linear]:
    """Linear layers named by ``config.targets`` in the blocks ``config.layers`` names; every target
    must match at least once."""
    linears = {n: m for n, m in linear_modules(model).items() if not n.endswith("lm_head")}
    missing = [t for t in config.targets if not any(_matches(n, t) for n in linears)]
    if missing:
        raise TargetNotFoundError(
            f"target module(s) {', '.join(missing)} not found in {type(model).__name__}; "
            f"its linear layers are: {_available(linears)}"
        )
    targets = {n: m for n, m in linears.items() if any(_matches(n, t) for t in config.targets)}
    if config.layers == "all":
        return targets
    blocks = {name: block_index(name) for name in targets}
    adapted = config.adapted_blocks(target_blocks(model, config))
    return {n: m for n, m in targets.items() if blocks[n] in adapted}


def target_blocks(model: nn.Module, config: OMoEConfig) -> int:
    """Number of blocks of ``model``: one more than the highest block index of a target linear."""
    linears = linear_modules(model)
    names = [n for n in linears if not n.endswith("lm_head") and any(_matches(n, t) for t in config.targets)]
    num_blocks = max(block_index(n) for n in names) + 1
    check_layers_in_range(config, num_blocks)
    return num_blocks


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _experts(config: OMoEConfig, linear: nn.Linear, num_experts: int) -> LoRAExperts:
    cls = DoRAExperts if config.use_dora else LoRAExperts
    experts = cls(
        linear.in_features,
        linear.out_features,
        num_experts=num_experts,
        r=config.r,
        alpha=config.alpha,
        dropout=config.dropout,
        device=linear.weight.device,
    )
    experts.init_magnitude(linear)
    return experts


def _adapter_linear(config: OMoEConfig, linear: nn.Linear) -> AdapterLinear:
    return AdapterLinear(linear, _experts(config, linear, 1))


class SingleAdapter:
    """LoRA or DoRA on every target linear (the single-adapter baselines)."""

    def inject(self, model: nn.Module, config: OMoEConfig, token_mask: TokenMask) -> None:
        for name, linear in resolve_targets(model, config).items():
            set_module(model, name, _adapter_linear(config, linear))


class MixtureOfExperts:
    """A router and ``k`` experts per FFN block or per linear; OMoE when ``orthogonal``."""

    def __init__(self, orthogonal: bool):
        self.orthogonal = orthogonal

    def mixer(self, config: OMoEConfig, block: int, orthogonal_blocks: set[int]) -> ExpertMixer:
        if self.orthogonal and block in orthogonal_blocks:
            return OrthogonalMixer(config.orthogonalize, config.normalize, config.gs_eps)
        return ExpertMixer()

    def router(self, config: OMoEConfig, in_features: int, device) -> Router:
        return Router(
            in_features, config.num_experts, config.routing, config.top_k, config.router_init_std, device
        )

    def inject(self, model: nn.Module, config: OMoEConfig, token_mask: TokenMask) -> None:
        INJECT_TOPOLOGY[config.topology](self, model, config, token_mask)


def _inject_ffn(method: MixtureOfExperts, model, config, token_mask) -> None:
    """Topology 'ffn': experts on gate/up/down of each block MLP, plain LoRA on the other targets."""
    targets = resolve_targets(model, config)
    mlps = gated_mlps(model)
    if not mlps:
        raise TargetNotFoundError(
            f"topology 'ffn' needs gated MLPs (gate_proj/up_proj/down_proj + act_fn, the LLaMA family); "
            f"{type(model).__name__} has none. Its linear layers are: {_available(linear_modules(model))}. "
            "Use topology 'linear' instead"
        )
    ffn_targets = [p for p in FFN_PROJECTIONS if f"{p}_proj" in {t.rsplit(".", 1)[-1] for t in targets}]
    if not ffn_targets:
        raise TargetNotFoundError(
            "topology 'ffn' needs at least one of gate_proj, up_proj, down_proj in target_modules, "
            f"got {list(config.targets)}"
        )
    blocks = {name: block_index(name) for name in mlps}
    num_blocks = max(blocks.values()) + 1
    check_layers_in_range(config, num_blocks)
    orthogonal_blocks = config.orthogonal_blocks(num_blocks)
    adapted = config.adapted_blocks(num_blocks)
    mlps = {name: mlp for name, mlp in mlps.items() if blocks[name] in adapted}
    for name, mlp in mlps.items():
        experts = {
            p: _experts(config, getattr(mlp, f"{p}_proj"), config.num_experts)
            if f"{name}.{p}_proj" in targets
            else None
            for p in FFN_PROJECTIONS
        }
        router = method.router(config, mlp.gate_proj.in_features, mlp.gate_proj.weight.device)
        mixer = method.mixer(config, blocks[name], orthogonal_blocks)
        set_module(model, name, MoEFeedForward(mlp, router, experts, mixer, token_mask))
    inside_mlp = tuple(f"{name}." for name in mlps)
    for name, linear in targets.items():
        if not name.startswith(inside_mlp):
            set_module(model, name, _adapter_linear(config, linear))


def _inject_linear(method: MixtureOfExperts, model, config, token_mask) -> None:
    """Topology 'linear': a router and experts on every target linear."""
    targets = resolve_targets(model, config)
    blocks = {name: block_index(name) for name in targets}
    orthogonal_blocks = config.orthogonal_blocks(target_blocks(model, config))
    for name, linear in targets.items():
        router = method.router(config, linear.in_features, linear.weight.device)
        experts = _experts(config, linear, config.num_experts)
        mixer = method.mixer(config, blocks[name], orthogonal_blocks)
        set_module(model, name, MoELinear(linear, router, experts, mixer, token_mask))


INJECT_TOPOLOGY = {"ffn": _inject_ffn, "linear": _inject_linear}


def injector(method: Method) -> SingleAdapter | MixtureOfExperts:
    """The object that injects ``method``'s adapters (config.use_dora selects DoRA experts)."""
    return MixtureOfExperts(method.orthogonal) if method.mixture else SingleAdapter()


def inject_adapters(model: nn.Module, config: OMoEConfig) -> TokenMask:
    """Freeze ``model`` and replace its targets by adapter layers. Returns the shared token mask."""
    for p in model.parameters():
        p.requires_grad_(False)
    token_mask = TokenMask()
    injector(METHODS[config.method]).inject(model, config, token_mask)
    return token_mask


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every adapter layer (AdapterLinear or MoE layer) of an injected model."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear | MoEFeedForward | MoELinear):
            yield name, module
