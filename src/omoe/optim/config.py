"""``OrthogonalConfig``: the options of the orthogonal expert optimizer (docs/method.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from omoe.errors import ConfigError
from omoe.options import check_int

PLACEMENTS = ("factored", "full")
PROJECTS = ("both", "A", "B")
COMBINES = ("union", "mean")


@dataclass
class OrthogonalConfig:
    """The orthogonal expert optimizer (Liu et al. 2023), used when optim.optimizer is 'orthogonal':
    after accumulate_steps steps that collect the experts' input statistics, orthogonal_steps steps
    make each expert's update orthogonal to the other experts' inputs."""

    accumulate_steps: int = field(
        default=10,
        metadata={
            "help": "accumulating-phase length K_a: base-optimizer steps that collect statistics, >= 1"
        },
    )
    orthogonal_steps: int = field(
        default=1,
        metadata={"help": "orthogonal-phase length K_o: steps whose expert updates are projected, >= 1"},
    )
    alpha: float = field(
        default=1e-3,
        metadata={"help": "OWM regulariser of P = I - X^T (X X^T + alpha I)^-1 X, > 0"},
    )
    warmup_steps: int = field(
        default=0,
        metadata={"help": "plain base-optimizer steps (no statistics) before the first accumulating phase"},
    )
    reset: bool = field(
        default=True,
        metadata={"help": "forget the statistics after each orthogonal phase (projectors back to I)"},
    )
    placement: str = field(
        default="factored",
        metadata={
            "help": f"one of {PLACEMENTS}: 'factored' keeps each expert's input means X (in x n) and solves "
            "an n x n system; 'full' keeps dense in x in RLS projectors (small models; the reference)"
        },
    )
    max_directions: int = field(
        default=64,
        metadata={"help": "input means kept per expert (the newest), n: memory 4 x in x n bytes per expert"},
    )
    project: str = field(
        default="both",
        metadata={
            "help": f"one of {PROJECTS}: which expert matrices are projected; 'B' alone (r x r projectors "
            "of the rank-r codes A x) is the cheapest"
        },
    )
    combine: str = field(
        default="union",
        metadata={
            "help": f"one of {COMBINES}: 'union' makes expert i's update orthogonal to the span of all other "
            "experts' inputs; 'mean' averages their projectors instead (equal for 2 experts, for more only a damping)"
        },
    )

    def __post_init__(self) -> None:
        for key in ("accumulate_steps", "orthogonal_steps", "max_directions"):
            check_int(f"orthogonal.{key}", getattr(self, key), 1)
        check_int("orthogonal.warmup_steps", self.warmup_steps, 0)
        if isinstance(self.alpha, bool) or not (
            isinstance(self.alpha, (int, float)) and self.alpha > 0 and math.isfinite(self.alpha)
        ):
            raise ConfigError(f"orthogonal.alpha must be a finite number > 0, got {self.alpha!r}")
        for key, allowed in (("placement", PLACEMENTS), ("project", PROJECTS), ("combine", COMBINES)):
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"unknown orthogonal.{key} {getattr(self, key)!r}; allowed: {', '.join(allowed)}"
                )

    @property
    def cycle(self) -> int:
        return self.accumulate_steps + self.orthogonal_steps

