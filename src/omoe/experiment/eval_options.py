"""The ``eval`` block of an experiment file: how every cell is scored (protocols, test records,
batch size, generation length), checked when the file is read."""

from __future__ import annotations

from dataclasses import dataclass, field

from omoe.data.tasks import get_task
from omoe.errors import ConfigError
from omoe.eval.evaluate import PROTOCOLS, get_protocol


@dataclass
class EvalOptions:
    """How every cell is evaluated (the ``eval`` block)."""

    protocols: list[str] = field(
        default_factory=lambda: ["generate"],
        metadata={"help": f"protocols to score each test set with, from {', '.join(PROTOCOLS)}"},
    )
    limit: int | None = field(
        default=None, metadata={"help": "first N test records of each task (file order); null = all"}
    )
    batch_size: int = field(default=8, metadata={"help": "prompts per forward/generate call"})
    max_new_tokens: int = field(default=32, metadata={"help": "generate only: generation length limit"})
    num_beams: int = field(default=1, metadata={"help": "generate only: 1 = greedy"})
    tasks: list[str] | None = field(
        default=None,
        metadata={
            "help": "multi-task cells: the test sets to score (default: the trained tasks); single-task "
            "cells are scored on their own task"
        },
    )
    split: str | None = field(
        default=None,
        metadata={"help": "bundled split to score (default: test, or sample where only one ships)"},
    )

    def __post_init__(self) -> None:
        for key in ("limit", "batch_size", "max_new_tokens", "num_beams"):
            value = getattr(self, key)
            if (value is not None or key != "limit") and (isinstance(value, bool) or value < 1):
                raise ConfigError(f"eval.{key} must be an integer >= 1, got {value!r}")
        if not self.protocols:
            raise ConfigError("eval.protocols must name at least one protocol")
        if len(set(self.protocols)) != len(self.protocols):
            raise ConfigError(f"eval.protocols lists a protocol twice: {self.protocols}")
        for name in self.protocols:
            get_protocol(name, **self.generation_options(name))
        for name in self.tasks or []:
            self.split_of(name)

    def split_of(self, task: str) -> str:
        """The split scored for ``task``; raises if the task does not ship it."""
        t = get_task(task)
        split = self.split or t.eval_split
        if split not in t.splits:
            raise ConfigError(
                f"task {t.name} has no bundled {split!r} split; it ships: {', '.join(t.splits)}"
            )
        return split

    def generation_options(self, protocol: str) -> dict:
        """Keyword arguments of :func:`omoe.eval.evaluate` for ``protocol``."""
        if protocol != "generate":
            return {}
        return {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams}

    def check_cell(self, eval_tasks: list[str], prompt: str, where: str) -> None:
        """Every test set ships the split scored, and every protocol scores the cell's prompt format."""
        for t in eval_tasks:
            self.split_of(t)
        for protocol in self.protocols:
            try:
                get_protocol(protocol, **self.generation_options(protocol), prompt=prompt)
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
