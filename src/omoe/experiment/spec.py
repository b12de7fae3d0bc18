"""An experiment file: one claim of the paper as a grid of cells, each one training run + evaluation.

The YAML names a ``base`` training config (the keys of ``omoe train``), ``methods`` (named
overrides of it), ``settings`` (``single``: one run per task, trained on its train split and scored
on its test split; ``multi``: one run on the mixture of ``tasks``, scored on each test split),
``seeds``, an optional ``sweep`` of any keys, and an ``eval`` block. :func:`load_experiment` checks
all of it and resolves every cell's :class:`~omoe.train.TrainConfig` before anything runs, so a bad
key, method, task or value is a one-line :class:`~omoe.errors.ConfigError`. Schema and examples:
``docs/experiments.md``.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from omoe import options
from omoe.errors import ConfigError
from omoe.experiment.eval_options import EvalOptions
from omoe.train.config import PAPER_TASKS, RESULT_FREE_KEYS, DataConfig, TrainConfig
from omoe.utils import flatten

SETTINGS = ("single", "multi")
SPEC_KEYS = (
    "name", "description", "base", "tasks", "settings", "methods", "seeds", "sweep", "eval",
    "results_dir", "work_dir",
)  # fmt: skip
# Keys the grid sets itself in every cell; methods and sweeps may not.
GRID_KEYS = ("output_dir", "seed", "data.tasks", "data.data_file", "data.task")
# Keys that do not change a cell's numbers: a result computed under other values still counts.
FREE_KEYS = RESULT_FREE_KEYS  # the trainer's list (also what a resumed run may change)
# Keys added after results were written, with the value that reproduces the earlier behaviour:
# alpaca was the only prompt format, training read the whole train file (now split train+val) and
# shuffled it plainly (group_by_length false), and adapters went on every block (adapter.layers all).
LEGACY_VALUES = {
    "data.prompt": "alpaca",
    "data.split": "train+val",
    "data.group_by_length": False,
    "adapter.layers": "all",
    "quantization": "none",  # issue 12: the base was never quantized before
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


@dataclass
class Cell:
    """One training run of the grid and the test sets it is scored on."""

    id: str
    method: str
    method_index: int
    overrides: dict  # the method's {dotted key: value}
    setting: str
    train_tasks: list[str]
    eval_tasks: list[str]
    seed: int
    sweep: dict  # {dotted key: value} of this sweep point
    sweep_index: int
    config: TrainConfig
    fingerprint: str = ""

    @property
    def work_dir(self) -> Path:
        return Path(self.config.output_dir)


@dataclass
class ExperimentSpec:
    """A parsed experiment file with every cell resolved."""

    name: str
    description: str
    path: Path | None
    eval: EvalOptions
    tasks: list[str]
    results_dir: Path
    work_dir: Path
    methods: dict[str, dict]
    cells: list[Cell]

    def result_path(self, cell: Cell) -> Path:
        return self.results_dir / f"{cell.id}.json"

    def select(self, patterns: list[str] | None) -> list[Cell]:
        """Cells whose id matches any pattern: a glob (``*``, ``?``, ``[``) or else a substring."""
        if not patterns:
            return list(self.cells)

        def hit(cell_id: str, pattern: str) -> bool:
            return fnmatchcase(cell_id, pattern) if any(c in pattern for c in "*?[") else pattern in cell_id

        chosen = [c for c in self.cells if any(hit(c.id, p) for p in patterns)]
        if not chosen:
            raise ConfigError(
                f"--only {' '.join(patterns)} matches no cell of {self.name}; cells: "
                + ", ".join(c.id for c in self.cells[:8])
                + (", ..." if len(self.cells) > 8 else "")
            )
        return chosen


def load_experiment(
    path: str | Path,
    results_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    prompt: str | None = None,
) -> ExperimentSpec:
    """Read and check an experiment file; resolve every cell's training config. ``prompt`` (the
    ``--prompt`` flag) replaces ``base.data.prompt``."""
    path = Path(path)
    data = options.read_yaml(path)
    return build_experiment(data, path, results_dir, work_dir, prompt)


def build_experiment(
    data: dict, path: Path | None = None, results_dir=None, work_dir=None, prompt: str | None = None
) -> ExperimentSpec:
    """Check an experiment file's mapping and resolve every cell (``path``: where it was read, for
    the messages; ``prompt``: see :func:`load_experiment`)."""
    where = str(path) if path else "experiment"
    unknown = [k for k in data if k not in SPEC_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(SPEC_KEYS)}")
    name = str(data.get("name") or (path.stem if path else ""))
    if not _NAME.fullmatch(name):
        raise ConfigError(f"{where}: name {name!r} must be letters, digits and . _ + - (a directory name)")
    base = _base(data.get("base") or {}, where, prompt)
    tasks = _str_list(data.get("tasks", _get(base, "data.tasks") or list(PAPER_TASKS)), "tasks", where)
    DataConfig(tasks=tasks)  # every task exists and ships a train split
    settings = _str_list(data.get("settings", ["multi"]), "settings", where)  # each once
    for s in settings:
        if s not in SETTINGS:
            raise ConfigError(f"{where}: unknown setting {s!r}; allowed: {', '.join(SETTINGS)}")
    seeds = _seeds(data, base, where)
    methods = _methods(data.get("methods"), where)
    points = _sweep_points(data.get("sweep"), where)
    eval_options = options.build(EvalOptions, data.get("eval"), "eval.")
    results_dir = Path(results_dir or data.get("results_dir") or Path("results") / name)
    work_dir = Path(work_dir or data.get("work_dir") or Path("runs") / "experiments" / name)

    cells: dict[str, Cell] = {}
    for seed, setting in itertools.product(seeds, settings):
        groups = [[t] for t in tasks] if setting == "single" else [tasks]
        for train_tasks, (sweep_index, point) in itertools.product(groups, enumerate(points)):
            for method_index, (method, overrides) in enumerate(methods.items()):
                cell_id, config = _cell_config(base, work_dir, method, overrides, setting, train_tasks, point,
                                               seed, where)  # fmt: skip
                eval_tasks = list(train_tasks) if setting == "single" else list(eval_options.tasks or tasks)
                eval_options.check_cell(eval_tasks, config.data.prompt, f"{where}: cell {cell_id}")
                if cell_id in cells:
                    raise ConfigError(
                        f"{where}: two cells would share the id {cell_id}; rename a method or sweep value"
                    )
                cells[cell_id] = Cell(cell_id, method, method_index, overrides, setting, list(train_tasks),
                                      eval_tasks, seed, point, sweep_index, config,
                                      fingerprint(config, eval_options, eval_tasks))  # fmt: skip
    description = str(data.get("description") or "")
    return ExperimentSpec(
        name, description, path, eval_options, tasks, results_dir, work_dir, methods, list(cells.values())
    )


def _base(base, where: str, prompt: str | None) -> dict:
    """The ``base`` block, nested and checked: valid alone, and without the keys the grid sets."""
    if not isinstance(base, dict):
        raise ConfigError(f"{where}: base must be a mapping of training-config keys, got {base!r}")
    base = _nested(flatten(base), f"{where}: base")
    if prompt is not None:
        options.set_dotted(base, TrainConfig, "data.prompt", prompt)
    for key in ("output_dir", "data.data_file", "data.task"):
        if _get(base, key) is not None:
            raise ConfigError(f"{where}: base.{key} is set by the grid (work_dir/<cell>, tasks); remove it")
    try:
        TrainConfig.from_dict(base)  # base alone must be valid
    except ConfigError as err:
        raise ConfigError(f"{where}: base: {err}") from None
    return base


def _seeds(data: dict, base: dict, where: str) -> list[int]:
    seeds = data.get("seeds", [_get(base, "seed") if _get(base, "seed") is not None else 42])
    seeds = seeds if isinstance(seeds, list) else [seeds]
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"{where}: seeds must be a list of integers >= 0, got {data.get('seeds')!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds lists a seed twice: {seeds}")
    return seeds


def _cell_config(base, work_dir, method, overrides, setting, train_tasks, point, seed, where):
    """``(cell id, TrainConfig)`` of one cell: the base, then the method, then the sweep point."""
    config_data = copy.deepcopy(base)
    for key, value in (*overrides.items(), *point.items()):  # the sweep wins over the method
        options.set_dotted(config_data, TrainConfig, key, copy.deepcopy(value))
    prompt = _get(config_data, "data.prompt") or "alpaca"
    cell_id = _cell_id(method, setting, train_tasks, point, seed, prompt)
    config_data["seed"] = seed
    config_data["output_dir"] = str(work_dir / cell_id)
    config_data.setdefault("data", {})["tasks"] = list(train_tasks)
    try:
        return cell_id, TrainConfig.from_dict(config_data)
    except ConfigError as err:
        raise ConfigError(f"{where}: cell {cell_id}: {err}") from None


def fingerprint(config: TrainConfig, eval_options: EvalOptions | None = None, eval_tasks=None) -> str:
    """Hash of everything that changes a cell's numbers (not paths, devices or logging); without
    ``eval_options``, of the training alone (to recognise a half-finished cell's work dir). Keys added
    later are left out at the value that did what the code did before them (:data:`LEGACY_VALUES`),
    so results written before they existed keep their fingerprint."""
    train = flatten(config.to_dict())
    payload: dict = {
        "train": {
            k: v
            for k, v in train.items()
            if not k.startswith(FREE_KEYS) and (k not in LEGACY_VALUES or v != LEGACY_VALUES[k])
        }
    }
    if eval_options is not None:
        payload.update(eval=options.to_dict(eval_options), eval_tasks=list(eval_tasks))
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- helpers
def _methods(raw, where: str) -> dict[str, dict]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"{where}: methods must map method names to overrides, e.g. lora_r16: {{adapter.method: lora}}"
        )
    methods = {}
    for name, overrides in raw.items():
        name = str(name)
        if not _NAME.fullmatch(name) or "__" in name:
            raise ConfigError(f"{where}: method name {name!r} must be letters, digits and . _ + - (no '__')")
        if overrides is None:
            overrides = {}
        if not isinstance(overrides, dict):
            raise ConfigError(
                f"{where}: methods.{name} must be a mapping of keys to values, got {overrides!r}"
            )
        flat = flatten(overrides)
        for key in flat:
            _check_key(key, f"{where}: methods.{name}")
        methods[name] = flat
    return methods


def _sweep_points(raw, where: str) -> list[dict]:
    """The cartesian product of the sweep; a key ``a,b`` sweeps several keys together."""
    if raw is None or raw == {}:
        return [{}]
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: sweep must map keys to lists of values, got {raw!r}")
    axes = []
    for key, values in raw.items():
        keys = [k.strip() for k in str(key).split(",")]
        for k in keys:
            _check_key(k, f"{where}: sweep")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: sweep.{key} must be a non-empty list of values, got {values!r}")
        axis = []
        for value in values:
            if len(keys) == 1:
                axis.append({keys[0]: value})
            elif isinstance(value, list) and len(value) == len(keys):
                axis.append(dict(zip(keys, value)))
            else:
                raise ConfigError(
                    f"{where}: sweep.{key} sweeps {len(keys)} keys together; each value must be a list of {len(keys)}, got {value!r}"
                )
        axes.append(axis)
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)]


def _check_key(key: str, where: str) -> None:
    if key in GRID_KEYS:
        raise ConfigError(
            f"{where}: {key} is set by the grid (seeds, tasks, settings, work_dir), not per method or sweep"
        )
    options.set_dotted({}, TrainConfig, key, None)  # unknown key: ConfigError listing the valid ones


def _cell_id(
    method: str, setting: str, tasks: list[str], point: dict, seed: int, prompt: str = "alpaca"
) -> str:
    parts = [method, f"single-{tasks[0]}" if setting == "single" else "multi"]
    if prompt != "alpaca" and "data.prompt" not in point:  # both formats can share a results directory
        parts.append(prompt)
    if point:
        short = {k: k.rsplit(".", 1)[-1] for k in point}
        if len(set(short.values())) < len(short):
            short = {k: k for k in point}
        parts.append("+".join(f"{short[k]}-{_slug(v)}" for k, v in point.items()))
    parts.append(f"seed{seed}")
    return "__".join(parts)


def _slug(value) -> str:
    if isinstance(value, list):
        return "_".join(_slug(v) for v in value)
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text)


def _nested(flat: dict, where: str) -> dict:
    nested: dict = {}
    for key, value in flat.items():
        try:
            options.set_dotted(nested, TrainConfig, key, value)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
    return nested


def _get(data: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _str_list(value, key: str, where: str) -> list[str]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key} must be a non-empty list of names, got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}: {key} lists a name twice: {value}")
    return value
