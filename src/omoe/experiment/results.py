"""One cell's result, as ``omoe experiment`` writes it (``results_dir/<cell>.json``) and ``omoe
report`` reads it: :class:`CellResult` and its parts.

The JSON is :meth:`CellResult.to_dict`, key for key in field order (schema 1, unchanged since the
first results were committed). Reading is lenient where older files are shorter: a result written
before the prompt formats has no ``eval.prompt`` (it was ``alpaca``), one written before the records
files has no ``records_file``, and a part missing altogether (``train``, ``wall_seconds``) reads as
its defaults. A file from a newer schema, or one missing a key the tables need, is a one-line
:class:`~omoe.errors.ConfigError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from omoe.errors import ConfigError

RESULT_KIND = "omoe.experiment.cell"
SCHEMA_VERSION = 1


def _known(cls, data: dict) -> dict:
    """The items of ``data`` that are fields of ``cls`` (keys of other versions are left out)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass(kw_only=True)
class Score:
    """One test set scored with one protocol (:func:`omoe.eval.evaluate`'s metrics, slimmed)."""

    accuracy: float
    acc_norm: float | None = None  # loglik only
    n: int
    correct: int | None = None
    no_match: int | None = None
    seconds: float | None = None
    prediction_counts: dict[str, int] | None = None  # since the answers table; older results lack it
    answer_counts: dict[str, int] | None = None

    @classmethod
    def from_dict(cls, metrics: dict) -> Score:
        """The kept keys of a metrics dict (evaluate's others, such as ``precision``, are left out)."""
        return cls(**_known(cls, metrics))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(kw_only=True)
class TrainSummary:
    """The cell's training run (its ``train_results.json`` and metrics log)."""

    steps: int | None = None
    num_examples: int | None = None
    num_truncated: int | None = None
    first_loss: float | None = None
    final_loss: float | None = None
    wall_seconds: float | None = None  # over all resumptions of the cell
    resumed_from: str | None = None  # the checkpoint this call resumed from
    trained_in_this_call: bool = True  # False: a trained adapter was evaluated


@dataclass(kw_only=True)
class EvalSummary:
    """How the cell was scored (the experiment's ``eval`` block)."""

    protocols: list[str]
    prompt: str = "alpaca"  # the format of training and of every protocol's prompts
    limit: int | None = None
    batch_size: int | None = None
    max_new_tokens: int | None = None
    num_beams: int | None = None
    splits: dict[str, str] = field(default_factory=dict)  # task -> split scored


@dataclass(kw_only=True)
class WallSeconds:
    """Seconds spent in this call (None where a result does not say)."""

    load: float | None = None  # the base model; 0 when an earlier cell of the process loaded it
    train: float | None = None  # this call only (TrainSummary.wall_seconds: over all resumptions)
    eval: float | None = None
    total: float | None = None


@dataclass(kw_only=True)
class CellResult:
    """One finished cell: what ran (method, setting, seed, sweep point, training config), its
    scores per test set and protocol, and where and how long it ran."""

    schema: int = SCHEMA_VERSION
    experiment: str
    description: str = ""
    config_file: str | None = None
    cell: str  # the cell id, also the file's stem
    method: str
    method_index: int  # the method's place in the experiment file (row order)
    method_overrides: dict = field(default_factory=dict)
    setting: str  # single | multi
    tasks: list[str] = field(default_factory=list)  # the experiment's tasks (column order)
    train_tasks: list[str] = field(default_factory=list)
    eval_tasks: list[str]
    seed: int
    sweep: dict = field(default_factory=dict)  # {dotted key: value} of the sweep point
    sweep_index: int
    fingerprint: str = ""
    train_config: dict  # TrainConfig.to_dict() as written (a dict: older keys stay readable)
    trainable_parameters: int
    train: TrainSummary = field(default_factory=TrainSummary)
    eval: EvalSummary
    metrics: dict[str, dict[str, Score]]  # task -> protocol -> score
    hardware: dict = field(default_factory=dict)  # device, device name, threads, library versions
    wall_seconds: WallSeconds = field(default_factory=WallSeconds)
    records_file: str | None = None  # per-record results beside the JSON; older results lack it
    work_dir: str | None = None
    finished_at: str | None = None

    def to_dict(self) -> dict:
        """The JSON object (``kind`` first, then the fields in order)."""
        out: dict = {"kind": RESULT_KIND}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "metrics":
                value = {t: {p: s.to_dict() for p, s in by.items()} for t, by in value.items()}
            elif f.name in ("train", "eval", "wall_seconds"):
                value = {g.name: getattr(value, g.name) for g in fields(value)}
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict, where: str = "result") -> CellResult:
        """Read a result object; ``where`` (its file) starts any error message."""
        if not isinstance(data, dict) or data.get("kind") != RESULT_KIND:
            raise ConfigError(f"{where} is not a result of omoe experiment (kind {RESULT_KIND} expected)")
        schema = data.get("schema", 1)
        if isinstance(schema, bool) or not isinstance(schema, int) or not 1 <= schema <= SCHEMA_VERSION:
            raise ConfigError(
                f"{where}: result schema {schema!r}; this omoe reads schema 1 to {SCHEMA_VERSION} (a newer omoe wrote it?)"
            )
        try:
            parts = {
                "train": TrainSummary(**_known(TrainSummary, data.get("train") or {})),
                "eval": EvalSummary(**_known(EvalSummary, data["eval"])),
                "wall_seconds": WallSeconds(**_known(WallSeconds, data.get("wall_seconds") or {})),
                "metrics": {t: {p: Score.from_dict(m) for p, m in by.items()}
                            for t, by in data["metrics"].items()},
            }  # fmt: skip
            return cls(**{**_known(cls, data), **parts})
        except KeyError as err:
            raise ConfigError(f"{where}: a cell result needs the key {err}") from None
        except (TypeError, AttributeError) as err:
            raise ConfigError(f"{where}: not a well-formed cell result ({err})") from None

    # ------------------------------------------------------------------ what the tables read
    @property
    def prompt(self) -> str:
        """The prompt format the cell was trained and scored in."""
        return self.eval.prompt

    def config_value(self, dotted: str):
        """A training-config value by dotted key (``adapter.r``); lists as tuples (hashable)."""
        value = self.train_config
        for part in dotted.split("."):
            value = value[part]
        return tuple(value) if isinstance(value, list) else value

    def adapter(self, key: str):
        """``adapter.<key>`` of the training config (lists as tuples)."""
        return self.config_value(f"adapter.{key}")
