"""``OrthogonalExpertOptimizer``: the orthogonal expert optimizer of Liu et al. 2023 (arXiv 2310.09762)
around any torch optimizer. The algorithm and every choice: docs/method.md, "Orthogonal expert optimizer".

Training alternates an *accumulating* phase (``accumulate_steps`` plain steps of the base optimizer,
while forward hooks collect each expert's routing-weighted input means) with an *orthogonal* phase
(``orthogonal_steps`` steps whose applied expert updates are projected onto the complement of the
other experts' inputs: ``W_i <- W_i_old + (W_i_new - W_i_old) P_{-i}``, OWM applied to MoE).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from omoe.errors import ConfigError
from omoe.layers import LoRAExperts, MoEFeedForward, MoELayer, MoELinear
from omoe.optim import projectors
from omoe.optim.config import OrthogonalConfig
from omoe.optim.statistics import Source, gather_in_order, routed_means

WARMUP, ACCUMULATE, ORTHOGONAL = "warmup", "accumulate", "orthogonal"


@dataclass
class ExpertGroup:
    """One stacked-experts module (A ``(E, r, in)``, B ``(E, out, r)``) and the source of its inputs."""

    name: str
    experts: LoRAExperts
    source: str  # key into OrthogonalExpertOptimizer.sources


def expert_groups(model: nn.Module) -> tuple[list[ExpertGroup], dict[str, MoELayer]]:
    """Every expert module of every MoE layer of ``model``, and the MoE layers by name."""
    groups, layers = [], {}
    for name, layer in model.named_modules():
        if isinstance(layer, MoELinear):
            groups.append(ExpertGroup(f"{name}.omoe_experts", layer.omoe_experts, f"{name}:input"))
        elif isinstance(layer, MoEFeedForward):
            for proj, experts in layer.omoe_experts.items():
                source = (
                    f"{name}:hidden" if proj == "down" else f"{name}:input"
                )  # down reads each expert's hidden
                groups.append(ExpertGroup(f"{name}.omoe_experts.{proj}", experts, source))
        else:
            continue
        layers[name] = layer
    return groups, layers


class OrthogonalExpertOptimizer(torch.optim.Optimizer):
    """Wraps ``base_optimizer`` (AdamW over ``model``'s trainable parameters by default).

    Non-expert parameters (attention LoRA, routers, DoRA magnitudes) are stepped by the base
    optimizer unchanged, and so are the experts in accumulating steps. ``param_groups`` and
    ``state`` are the base optimizer's, so LR schedulers and gradient scalers work on this object.
    ``state_dict()`` adds the statistics and the step counter (plain tensors and numbers).

    Args:
        model: a module holding MoE layers (an :class:`~omoe.tuners.model.OMoEModel` of method moe/omoe).
        base_optimizer: any torch optimizer over (at least) the experts' parameters.
        config: an :class:`OrthogonalConfig`; keyword ``options`` override its fields.
    """

    def __init__(
        self, model: nn.Module, base_optimizer=None, config: OrthogonalConfig | None = None, **options
    ):
        config = dataclasses.replace(config or OrthogonalConfig(), **options)
        groups, layers = expert_groups(model)
        if not groups:
            method = getattr(getattr(model, "omoe_config", None), "method", None)
            has = f"adapter method {method!r}" if method else f"a {type(model).__name__}"
            raise ConfigError(
                f"the orthogonal optimizer needs MoE experts, but the model ({has}) has none; "
                "methods with experts: moe, omoe"
            )
        if max(g.experts.num_experts for g in groups) < 2:
            raise ConfigError(
                "the orthogonal optimizer needs at least 2 experts per router; num_experts is 1"
            )
        if base_optimizer is None:
            base_optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)  # the same group dicts
        self.base = base_optimizer
        self._link()
        self.config = config
        self.groups = [g for g in groups if g.experts.num_experts > 1]
        self.steps = 0  # optimizer steps taken (a step skipped by a GradScaler does not count)
        self.sources, self.codes = self._allocate()
        self._routing: dict[str, tuple] = {}  # layer -> routing of its current forward (for down's hook)
        self._hooks = self._register_hooks(layers)

    # ------------------------------------------------------------------ construction
    def _link(self) -> None:
        """Share the base optimizer's groups and state (load_state_dict replaces its lists)."""
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.defaults = self.base.defaults

    def _allocate(self) -> tuple[dict[str, Source], dict[str, Source]]:
        """The input means of every source; with project 'B', every expert module's codes instead.

        Means X are kept where they are needed: A's factored projector, and B's codes taken with the
        A of the orthogonal step (project 'both'). Project 'B' keeps only the codes ``A_i x_j`` taken
        when each mean is collected, ``(E, cap, E r)`` per expert module: no in-dimension storage.
        """
        c = self.config
        need_x = c.project == "both" or (c.project == "A" and c.placement == "factored")
        need_p = c.placement == "full" and c.project != "B"
        sources, codes = {}, {}
        for g in self.groups:
            E, r, d, dev = g.experts.num_experts, g.experts.r, g.experts.in_features, g.experts.lora_A.device
            sources.setdefault(g.source, Source.empty(E, d, c.max_directions if need_x else 0, need_p, dev))
            if c.project == "B":
                codes[g.name] = Source.empty(E, E * r, c.max_directions, False, dev)
        return sources, codes

    def _statistics(self):
        """``(section, key, Source)`` of every statistic held."""
        yield from (("sources", k, s) for k, s in self.sources.items())
        yield from (("codes", k, s) for k, s in self.codes.items())

    def _register_hooks(self, layers: dict[str, MoELayer]) -> list:
        hooks = []
        for name, layer in layers.items():
            if f"{name}:input" not in self.sources and f"{name}:hidden" not in self.sources:
                continue
            hooks.append(layer.omoe_router.register_forward_hook(self._router_hook(name, layer)))
            if f"{name}:hidden" in self.sources:
                down = layer.omoe_experts["down"]
                hooks.append(down.register_forward_hook(self._down_hook(name, layer)))
        return hooks

    def _collecting(self, layer: nn.Module) -> bool:
        # Not in a backward pass: activation checkpointing re-runs forwards there.
        return layer.training and self.phase == ACCUMULATE and torch._C._current_graph_task_id() == -1

    def _router_hook(self, name: str, layer: MoELayer):
        source = self.sources.get(f"{name}:input")

        def hook(module, args, routing):
            if not self._collecting(layer):
                return
            x = args[0]  # (N, d) the layer input, read by the router and by the input-side experts
            mask = layer.token_mask.get(x.shape[0])
            self._routing[name] = (routing.weights, routing.indices, mask)
            if source is not None:
                source.pending.append(
                    routed_means(x, routing.weights, routing.indices, mask, source.num_experts)
                )

        return hook

    def _down_hook(self, name: str, layer: MoELayer):
        source = self.sources[f"{name}:hidden"]

        def hook(module, args, output):
            routing = self._routing.pop(name, None)
            if routing is None or not self._collecting(layer):
                return
            weights, indices, mask = routing
            h = args[0]  # (S, N, I) each slot's hidden, the down experts' input
            source.pending.append(routed_means(h, weights, indices, mask, source.num_experts))

        return hook

    def remove_hooks(self) -> None:
        """Stop collecting statistics (the model keeps working; call when training ends)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # ------------------------------------------------------------------ phases
    def phase_of(self, step: int) -> str:
        c = self.config
        if step < c.warmup_steps:
            return WARMUP
        return ACCUMULATE if (step - c.warmup_steps) % c.cycle < c.accumulate_steps else ORTHOGONAL

    @property
    def phase(self) -> str:
        """The phase of the next step: 'warmup', 'accumulate' or 'orthogonal'."""
        return self.phase_of(self.steps)

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the statistics (means and dense projectors)."""
        return sum(
            t.numel() * t.element_size() for *_, s in self._statistics() for t in (s.X, s.P) if t is not None
        )

    def describe(self) -> str:
        """One line: placement, layers, experts and projector memory (dense in x in for comparison)."""
        c = self.config
        dense = sum(4 * s.num_experts * s.dim**2 for s in self.sources.values())
        layers = len({k.split(":")[0] for k in self.sources})
        return (
            f"orthogonal optimizer: {c.accumulate_steps} accumulating + {c.orthogonal_steps} orthogonal steps, "
            f"alpha {c.alpha:g}, project {c.project}, {c.combine} of projectors, {c.placement} placement: "
            f"{self.memory_bytes / 2**20:.1f} MiB of statistics over {layers} MoE layers "
            f"(dense in x in projectors: {dense / 2**20:.1f} MiB)"
        )

    # ------------------------------------------------------------------ the optimizer interface
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)
        self._discard_pending()  # statistics of a step that was not taken (GradScaler skipped it)

    def step(self, closure=None):
        phase = self.phase
        old = None
        if phase == ORTHOGONAL:
            old = {
                id(t): t.detach().clone() for g in self.groups for t in (g.experts.lora_A, g.experts.lora_B)
            }
        loss = self.base.step(closure) if closure is not None else self.base.step()
        if phase == ACCUMULATE:
            self._commit()
        elif phase == ORTHOGONAL:
            self._project(old)
        self._discard_pending()
        self.steps += 1
        if phase == ORTHOGONAL and self.phase != ORTHOGONAL and self.config.reset:
            for *_, s in self._statistics():
                s.reset()
        return loss

    def _discard_pending(self) -> None:
        self._routing.clear()
        for s in self.sources.values():
            s.pending.clear()

    @torch.no_grad()
    def _commit(self) -> None:
        """Append this step's means (from every process, in micro-batch order) to the statistics."""
        keys = list(self.sources)
        local = [
            torch.stack(s.pending)
            if s.pending
            else torch.zeros(0, s.num_experts, s.dim, device=s.count.device)
            for s in (self.sources[k] for k in keys)
        ]
        gathered = dict(zip(keys, gather_in_order(local)))
        for key, means in gathered.items():
            self.sources[key].append(means, self.config.alpha, self.config.combine)
        for g in self.groups:
            if g.name in self.codes:  # (M, E_j, E_i r): expert j's mean under every expert i's current A
                A = g.experts.lora_A.float()
                codes = torch.einsum("ird,mjd->mjir", A, gathered[g.source]).flatten(2)
                self.codes[g.name].append(codes, self.config.alpha, self.config.combine)

    @torch.no_grad()
    def _project(self, old: dict[int, torch.Tensor]) -> None:
        """``W_i <- W_i_old + (W_i_new - W_i_old) P_{-i}`` for A (input space) and B (code space)."""
        c = self.config
        for g in self.groups:
            source = self.sources[g.source]
            A, B = g.experts.lora_A, g.experts.lora_B
            A_old, B_old = old[id(A)], old[id(B)]
            X = source.directions()  # (E, n, d) or None
            if c.project in ("both", "A"):
                delta = A - A_old  # (E, r, in)
                if source.P is not None:
                    delta = projectors.dense_project(delta, source.P, c.combine)
                elif X is not None:
                    delta = projectors.project_out(delta, X, c.alpha, c.combine)
                A.copy_(A_old + delta)
            # B's input is the code z = A_i x: project with the codes of the others' inputs, under the A
            # of this step's start (so that dB A_old x = 0 as well), or as collected (project 'B').
            if c.project == "both" and X is not None:
                codes = projectors.codes(A_old, X)  # (E_i, E_j, n, r)
            elif c.project == "B" and (stored := self.codes[g.name].directions()) is not None:
                E, n = stored.shape[:2]
                codes = stored.view(E, n, E, -1).permute(2, 0, 1, 3)  # (E_j, n, E_i, r) -> (E_i, E_j, n, r)
            else:
                continue
            delta = projectors.project_out(B - B_old, codes, c.alpha, c.combine)
            B.copy_(B_old + delta)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        sd = self.base.state_dict()
        sd["orthogonal"] = {"steps": self.steps, "sources": {}, "codes": {}}
        for section, key, s in self._statistics():
            tensors = (("count", s.count), ("X", s.X), ("P", s.P))
            sd["orthogonal"][section][key] = {name: t.clone() for name, t in tensors if t is not None}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("orthogonal", None)
        if saved is None:
            raise ConfigError("this optimizer state has no orthogonal-optimizer statistics (saved by AdamW?)")
        self.base.load_state_dict(state_dict)
        self._link()
        own_keys = {(section, key) for section, key, _ in self._statistics()}
        saved_keys = {(section, key) for section in ("sources", "codes") for key in saved.get(section, {})}
        if own_keys != saved_keys:
            differ = sorted(own_keys ^ saved_keys)[0]
            raise ConfigError(
                f"saved orthogonal statistics do not fit this optimizer: {'/'.join(differ)!r} differs "
                "(model or orthogonal.project changed?)"
            )
        for section, key, source in self._statistics():
            for name, value in saved[section][key].items():
                own = getattr(source, name)
                if own is None or own.shape != value.shape:
                    raise ConfigError(
                        f"saved orthogonal statistics {key}/{name} have shape {tuple(value.shape)}; this "
                        f"optimizer holds {None if own is None else tuple(own.shape)} (placement or "
                        "max_directions changed?)"
                    )
                own.copy_(value)
        self.steps = int(saved["steps"])
        self._discard_pending()

    def add_param_group(self, param_group: dict) -> None:
        if "base" not in self.__dict__:  # Optimizer.__init__ registering the base's groups
            return super().add_param_group(param_group)
        self.base.add_param_group(param_group)
        self._link()
        return None
