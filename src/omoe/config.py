"""``OMoEConfig``: which adapter method, where, and how. ``OMoEConfig()`` is the paper's setting."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from omoe.errors import ConfigError
from omoe.options import check_int
from omoe.registry import METHODS, ROUTINGS, TOPOLOGIES
from omoe.utils import json_text

LAYER_PRESETS = ("all", "none", "low", "medium", "high", "low+medium", "low+high", "medium+high")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_NAME = "adapter_config.json"

# The paper's thirds for LLaMA-2 7B (32 blocks): 1-10, 11-20, 21-32. Other depths keep the
# proportions 10/32 and 20/32 of the boundaries (docs/method.md, "Layer-wise OMoE").
_THIRD_BOUNDS = (10 / 32, 20 / 32)


@dataclass
class OMoEConfig:
    """Configuration of an omoe adapter. With no arguments: OMoE-LoRA as in the paper (2 experts,
    soft routing, r=16, alpha=32, dropout 0.05, experts on each block's FFN, LoRA on q/k/v/o)."""

    method: str = field(
        default="omoe",
        metadata={"help": f"adapter method, one of {tuple(METHODS)}: single LoRA/DoRA, vanilla MoE-LoRA, or OMoE"},
    )
    topology: str = field(
        default="ffn",
        metadata={
            "help": "where experts sit (moe/omoe): 'ffn' = one router and k experts per block MLP, each a "
            "LoRA on gate/up/down (the paper's); 'linear' = a router and experts on every target linear"
        },
    )
    num_experts: int = field(default=2, metadata={"help": "experts per router (moe/omoe)"})
    top_k: int | None = field(
        default=None, metadata={"help": "experts per token; None = soft routing over all experts"}
    )
    routing: str | None = field(
        default=None,
        metadata={
            "help": f"one of {tuple(ROUTINGS)}; None = 'soft' when top_k is None, else 'topk' (renormalised). "
            "'switch' = top-1 weighted by its raw probability"
        },
    )
    r: int = field(default=16, metadata={"help": "LoRA rank of every adapter and expert"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA scaling numerator: scale = alpha / r"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the adapters' input, in [0, 1)"})
    use_dora: bool = field(
        default=False,
        metadata={
            "help": "DoRA instead of LoRA for every adapter and expert (OMoE-DoRA); method='dora' sets it"
        },
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "names (suffixes) of the linear layers to adapt; None = q/k/v/o/gate/up/down. Under "
            "topology 'ffn' the gate/up/down targets become the experts and the others get plain LoRA"
        },
    )
    router_aux_loss_coef: float = field(
        default=0.0, metadata={"help": "weight of the Switch/Mixtral load-balancing loss (0 = off)"}
    )
    layers: str | list[int] = field(
        default="all",
        metadata={
            "help": "which blocks (0-based) get adapters, as PEFT's layers_to_transform; the others stay "
            f"frozen and untouched. One of {LAYER_PRESETS}, a list of block indices, or ranges such as "
            "'22-29'. Adapting only the top blocks stops the backward pass there (cheaper training)"
        },
    )
    orthogonal_layers: str | list[int] = field(
        default="all",
        metadata={
            "help": "omoe only: which blocks (0-based) get OMoE; the others get vanilla MoE. "
            f"One of {LAYER_PRESETS}, a list of block indices, or ranges such as '0-9,20-29'"
        },
    )
    orthogonalize: bool = field(
        default=True, metadata={"help": "omoe ablation: Gram-Schmidt orthogonalisation"}
    )
    normalize: bool = field(
        default=True, metadata={"help": "omoe ablation: unit-normalise the orthogonal vectors"}
    )
    gs_eps: float = field(default=1e-6, metadata={"help": "norm guard of Gram-Schmidt, v/sqrt(|v|^2+eps^2)"})
    router_init_std: float = field(
        default=0.02, metadata={"help": "std of the router's normal initialisation"}
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; allowed: {', '.join(METHODS)}")
        if METHODS[self.method].dora:
            self.use_dora = True
        if self.topology not in TOPOLOGIES:
            raise ConfigError(f"unknown topology {self.topology!r}; allowed: {', '.join(TOPOLOGIES)}")
        check_int("r", self.r, 1)
        check_int("num_experts", self.num_experts, 1)
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.router_aux_loss_coef < 0:
            raise ConfigError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        if not self.gs_eps > 0:
            raise ConfigError(f"gs_eps must be > 0, got {self.gs_eps}")
        if self.top_k is not None:
            check_int("top_k", self.top_k, 1)
            if self.top_k > self.num_experts:
                raise ConfigError(
                    f"top_k={self.top_k} exceeds num_experts={self.num_experts}; allowed: 1..{self.num_experts} or None (soft)"
                )
        if self.routing is None:
            self.routing = "soft" if self.top_k is None else "topk"
        if self.routing not in ROUTINGS:
            raise ConfigError(f"unknown routing {self.routing!r}; allowed: {', '.join(ROUTINGS)}")
        if self.routing == "soft" and self.top_k not in (None, self.num_experts):
            raise ConfigError(
                f"routing 'soft' uses every expert; got top_k={self.top_k} (set routing='topk')"
            )
        if self.routing == "topk" and self.top_k is None:
            raise ConfigError("routing 'topk' needs top_k (1..num_experts)")
        if self.routing == "switch":
            if self.top_k not in (None, 1):
                raise ConfigError(f"routing 'switch' is top-1; got top_k={self.top_k}")
            self.top_k = 1
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ConfigError(
                    f"target_modules must be a non-empty list of names, got {self.target_modules!r}"
                )
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        if self.layers == "none" or self.layers == []:
            raise ConfigError("layers names no block; an adapter needs at least one (default: 'all')")
        _parse_layers(self.layers, 32, "layers")  # syntax check now; bounds checked on injection
        if isinstance(self.orthogonal_layers, tuple):
            self.orthogonal_layers = list(self.orthogonal_layers)
        _parse_layers(self.orthogonal_layers, 32)  # syntax check now; bounds checked on injection
        if not METHODS[self.method].orthogonal and self.orthogonal_layers != "all":
            raise ConfigError(f"orthogonal_layers applies to method 'omoe' only, not {self.method!r}")

    # ---------------------------------------------------------------- derived
    @property
    def is_moe(self) -> bool:
        """A mixture of experts (a router and experts), not a single adapter per linear."""
        return METHODS[self.method].mixture

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.target_modules) if self.target_modules is not None else DEFAULT_TARGETS

    def adapted_blocks(self, num_blocks: int) -> set[int]:
        """Indices of the blocks that get adapters (0-based), for a model with ``num_blocks`` blocks."""
        return _parse_layers(self.layers, num_blocks, "layers")

    def orthogonal_blocks(self, num_blocks: int) -> set[int]:
        """Indices of the blocks that get OMoE (0-based), for a model with ``num_blocks`` blocks."""
        if not METHODS[self.method].orthogonal:
            return set()
        return _parse_layers(self.orthogonal_layers, num_blocks)

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> OMoEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"omoe_version", "base_model_name_or_path"})
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}"
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, directory: str | Path, **extra) -> None:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json_text({**self.to_dict(), **extra}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> OMoEConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(data)


def _parse_layers(spec: str | list[int], num_blocks: int, key: str = "orthogonal_layers") -> set[int]:
    """Block indices named by a preset, a list of ints, or ranges like '0-9,20-29' (0-based)."""
    if isinstance(spec, list):
        blocks = spec
    elif isinstance(spec, str) and spec in LAYER_PRESETS:
        b1, b2 = (int(num_blocks * f + 0.5) for f in _THIRD_BOUNDS)
        thirds = {"low": range(b1), "medium": range(b1, b2), "high": range(b2, num_blocks)}
        if spec == "all":
            return set(range(num_blocks))
        if spec == "none":
            return set()
        return {i for part in spec.split("+") for i in thirds[part]}
    elif isinstance(spec, str) and re.fullmatch(r"\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*", spec):
        blocks = []
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            blocks.extend(range(int(lo), int(hi or lo) + 1))
    else:
        raise ConfigError(
            f"{key} {spec!r} not understood; allowed: {', '.join(LAYER_PRESETS)}, "
            "a list of block indices, or ranges like '0-9,20-29'"
        )
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in blocks):
        raise ConfigError(f"{key} must hold integers, got {spec!r}")
    return set(blocks)


def check_layers_in_range(config: OMoEConfig, num_blocks: int) -> None:
    """Raise if an explicit block index does not exist in a model of ``num_blocks`` blocks."""
    bad = sorted(i for i in config.adapted_blocks(num_blocks) if not 0 <= i < num_blocks)
    if bad:
        raise ConfigError(f"layers names block(s) {bad}; this model has blocks 0..{num_blocks - 1}")
    bad = sorted(i for i in config.orthogonal_blocks(num_blocks) if not 0 <= i < num_blocks)
    if bad:
        raise ConfigError(
            f"orthogonal_layers names block(s) {bad}; this model has blocks 0..{num_blocks - 1}"
        )
