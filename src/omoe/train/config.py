"""``TrainConfig``: one YAML file = one training run. ``TrainConfig()`` is the paper's setting.

Sections: ``adapter`` (:class:`~omoe.config.OMoEConfig`, the method), ``data``, ``optim``,
``logging``; the rest is top-level. Every field's help text is the ``omoe train --help`` line and
the comment of the YAML written beside each run (``train_config.yaml``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from omoe import options
from omoe.config import OMoEConfig
from omoe.data.prompts import PROMPT_FORMATS
from omoe.data.tasks import FULL_TRAIN_SPLIT, TASKS, get_task
from omoe.errors import ConfigError
from omoe.models.quantize import check_quantization
from omoe.optim import OrthogonalConfig

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "orthogonal")
ORTHOGONAL_FSDP = (
    "optim.optimizer 'orthogonal' does not support fsdp (its projections need each expert's whole A and B); "
    "use several processes without fsdp (data parallel) or optim.optimizer adamw"
)
# The paper's multi-task mixture (MixLoRA's): ARC-C, ARC-E, BoolQ and OBQA.
PAPER_TASKS = ("ARC-Challenge", "ARC-Easy", "boolq", "openbookqa")
TRAIN_SPLITS = ("train", FULL_TRAIN_SPLIT)


# Keys that do not change a run's numbers: a resumed run may change them, and an experiment cell
# computed under other values still counts (omoe.experiment.spec.fingerprint). Prefixes end in ".".
RESULT_FREE_KEYS = (
    "output_dir",
    "device",
    "fsdp",
    "gradient_checkpointing",
    "prefix_cache",
    "checkpoint_every",
    "keep_checkpoints",
    "logging.",
)

@dataclass
class DataConfig:
    """What to train on: bundled train splits, mixed, or your own file."""

    tasks: list[str] | None = field(
        default_factory=lambda: list(PAPER_TASKS),
        metadata={
            "help": "bundled tasks whose train splits are mixed and shuffled with `seed` (the paper's "
            "multi-task run: ARC-Challenge, ARC-Easy, boolq, openbookqa); ignored when data_file is set"
        },
    )
    data_file: str | None = field(
        default=None,
        metadata={"help": "your own LLM-Adapters-format .json/.json.gz file (replaces tasks); needs task"},
    )
    task: str | None = field(
        default=None,
        metadata={"help": "the task whose answer labels data_file holds (records are checked against them)"},
    )
    limit: int | None = field(
        default=None,
        metadata={
            "help": "records per task: a seeded random subset of each train split (data_file: its first "
            "N records); null = all"
        },
    )
    cutoff_len: int = field(
        default=512, metadata={"help": "tokens per example; longer ones are cut (and counted)"}
    )
    split: str = field(
        default="train",
        metadata={
            "help": f"bundled split to train on, one of {TRAIN_SPLITS}: 'train' leaves out the seeded val "
            "slice (min(500, 10%) of each train file; score it with omoe eval --split val), "
            f"'{FULL_TRAIN_SPLIT}' is the whole train file, as the paper trained"
        },
    )
    prompt: str = field(
        default="alpaca",
        metadata={
            "help": f"prompt format, one of {PROMPT_FORMATS}: 'alpaca' = LLM-Adapters' template, target "
            "'the correct answer is <label>' + EOS; 'moe-peft' = MoE-PEFT's per-task wording, target the "
            "label token (' A', ' true') only. Evaluate with the same format"
        },
    )
    train_on_inputs: bool = field(
        default=False, metadata={"help": "also train on the prompt tokens (default: response only)"}
    )
    group_by_length: bool = field(
        default=True,
        metadata={
            "help": "build each global batch from examples of similar length (sorted within groups of 50 "
            "batches, then the batches shuffled), so little compute goes to padding; false = plain shuffle"
        },
    )

    def __post_init__(self) -> None:
        if self.prompt not in PROMPT_FORMATS:
            raise ConfigError(f"unknown data.prompt {self.prompt!r}; allowed: {', '.join(PROMPT_FORMATS)}")
        if self.split not in TRAIN_SPLITS:
            raise ConfigError(f"unknown data.split {self.split!r}; allowed: {', '.join(TRAIN_SPLITS)}")
        if self.data_file is not None:
            if self.task is None:
                raise ConfigError("data.data_file needs data.task (which task's answer labels it holds)")
            if self.split != "train":
                raise ConfigError("data.split applies to the bundled data.tasks, not to data.data_file")
            get_task(self.task)
            self.tasks = None  # the file replaces the bundled mixture
        else:
            if self.task is not None:
                raise ConfigError("data.task applies to data.data_file; use data.tasks for bundled data")
            if not self.tasks:
                raise ConfigError("data.tasks must name at least one task (or set data.data_file)")
            if len(set(self.tasks)) != len(self.tasks):
                raise ConfigError(f"data.tasks lists a task twice: {self.tasks}")
            for name in self.tasks:
                task = get_task(name)
                if "train" not in task.splits:
                    with_train = [n for n, t in _tasks().items() if "train" in t.splits]
                    raise ConfigError(
                        f"task {name} has no bundled train split; tasks with one: {', '.join(with_train)} "
                        "(or pass your own file as data.data_file with data.task)"
                    )
        options.check_int("data.limit", self.limit, 1, nullable=True)
        options.check_int("data.cutoff_len", self.cutoff_len, 1)


def _tasks():
    return TASKS


@dataclass
class OptimConfig:
    """Optimisation: AdamW (alone or inside the orthogonal expert optimizer) with warmup and a decaying
    schedule."""

    lr: float = field(default=2e-4, metadata={"help": "peak learning rate of AdamW"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW's decoupled weight decay, >= 0"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1, in [0, 1)"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2, in [0, 1)"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon, > 0"})
    global_batch_size: int = field(
        default=16,
        metadata={
            "help": "examples per optimizer step over all processes = micro_batch_size x processes x "
            "accumulation steps (derived); the same for any number of processes"
        },
    )
    micro_batch_size: int = field(
        default=2, metadata={"help": "examples per forward/backward in one process (memory knob)"}
    )
    epochs: int = field(default=2, metadata={"help": "passes over the training data"})
    max_steps: int | None = field(
        default=None,
        metadata={"help": "stop after this many optimizer steps; replaces epochs in the schedule length"},
    )
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup from 0 over this many steps"})
    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "warmup as a fraction of all steps, in [0, 1); replaces warmup_steps when set"},
    )
    schedule: str = field(
        default="linear",
        metadata={"help": f"decay after warmup, one of {SCHEDULES} (linear/cosine decay to 0)"},
    )
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "clip the global gradient norm to this; null = no clipping"}
    )
    optimizer: str = field(
        default="adamw",
        metadata={
            "help": f"one of {OPTIMIZERS}: plain AdamW, or AdamW inside the orthogonal expert optimizer "
            "(Liu et al. 2023; moe/omoe only; options in optim.orthogonal)"
        },
    )
    orthogonal: OrthogonalConfig = field(default_factory=OrthogonalConfig)

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"optim.lr must be a finite number > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"optim.{key} must be in [0, 1), got {getattr(self, key)}")
        if not self.adam_eps > 0:
            raise ConfigError(f"optim.adam_eps must be > 0, got {self.adam_eps}")
        options.check_int("optim.global_batch_size", self.global_batch_size, 1)
        options.check_int("optim.micro_batch_size", self.micro_batch_size, 1)
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"optim.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"optim.micro_batch_size ({self.micro_batch_size})"
            )
        options.check_int("optim.epochs", self.epochs, 1)
        options.check_int("optim.max_steps", self.max_steps, 1, nullable=True)
        options.check_int("optim.warmup_steps", self.warmup_steps, 0)
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"optim.warmup_ratio must be in [0, 1) or null, got {self.warmup_ratio}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown optim.schedule {self.schedule!r}; allowed: {', '.join(SCHEDULES)}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"optim.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optim.optimizer {self.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per process per optimizer step; raises if the batch does not split evenly."""
        per_step = self.global_batch_size // self.micro_batch_size
        if per_step % world_size:
            raise ConfigError(
                f"optim.global_batch_size {self.global_batch_size} = {per_step} micro-batches of "
                f"{self.micro_batch_size} cannot be split over {world_size} processes; choose sizes with "
                f"global_batch_size a multiple of micro_batch_size x {world_size}"
            )
        return per_step // world_size

    def warmup_for(self, total_steps: int) -> int:
        if self.warmup_ratio is not None:
            return math.ceil(self.warmup_ratio * total_steps)
        return self.warmup_steps


@dataclass
class LoggingConfig:
    """Feedback: progress bar, metrics files, TensorBoard."""

    log_every: int = field(
        default=1, metadata={"help": "optimizer steps between rows of metrics.jsonl / metrics.csv"}
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar (loss, lr, tokens/s)"})
    tensorboard: bool = field(
        default=True,
        metadata={"help": "also log to output_dir/tensorboard when the tensorboard package is installed"},
    )

    def __post_init__(self) -> None:
        options.check_int("logging.log_every", self.log_every, 1)


@dataclass
class TrainConfig:
    """A training run: base model, adapter, data, optimisation, outputs."""

    model: str = field(
        default="smollm2-135m-instruct",
        metadata={"help": "base model: built-in name, .gguf file or local Hugging Face directory"},
    )
    output_dir: str = field(
        default="runs/train",
        metadata={
            "help": "where the adapter, train_config.yaml, metrics and checkpoints/ go (--resume continues it)"
        },
    )
    seed: int = field(
        default=42,
        metadata={"help": "seeds the adapter's initialisation, the data mixture and order, and dropout"},
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": f"autocast dtype, one of {PRECISIONS}: auto = bf16 on CUDA when supported (else fp16) "
            "and on CPUs with native bf16 (avx512_bf16/amx_bf16), else fp32; weights and optimizer stay fp32"
        },
    )
    quantization: str = field(
        default="none",
        metadata={
            "help": "none, 8bit or 4bit: load the base model's frozen linears quantized by bitsandbytes "
            "(LLM.int8, or NF4 QLoRA-style); the adapter trains in fp32 on top (CUDA, or bitsandbytes' CPU backend)"
        },
    )
    device: str = field(
        default="auto",
        metadata={
            "help": "auto (CUDA if available, else CPU), cpu, cuda; under torchrun each process uses cuda:LOCAL_RANK"
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute each transformer block in backward: less memory, ~30% slower"},
    )
    prefix_cache: bool = field(
        default=True,
        metadata={
            "help": "when adapter.layers leaves the bottom blocks frozen, remember their output per training "
            "sequence (omoe.models.prefix) instead of recomputing it every epoch; same results up to rounding"
        },
    )
    fsdp: bool = field(
        default=False,
        metadata={
            "help": "with several processes, shard base weights and adapter with FSDP2 (fully_shard) instead "
            "of replicating them; `accelerate launch` with configs/accelerate_fsdp.yaml turns it on"
        },
    )
    checkpoint_every: int = field(
        default=0,
        metadata={"help": "write a resumable checkpoint every N optimizer steps (0 = never)"},
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "how many of the newest checkpoints to keep"})
    adapter: OMoEConfig = field(default_factory=OMoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model must name a built-in model, a .gguf file or a model directory")
        if not self.output_dir:
            raise ConfigError("output_dir must be a directory path")
        options.check_int("seed", self.seed, 0)
        check_quantization(self.quantization)
        if self.quantization != "none" and self.fsdp:
            raise ConfigError(
                "quantization 8bit/4bit does not combine with fsdp; use one process, or quantization none"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"unknown device {self.device!r}; allowed: auto, cpu, cuda, cuda:N")
        options.check_int("checkpoint_every", self.checkpoint_every, 0)
        options.check_int("keep_checkpoints", self.keep_checkpoints, 1)
        if self.optim.optimizer == "orthogonal":
            if not self.adapter.is_moe:
                raise ConfigError(
                    f"optim.optimizer 'orthogonal' needs MoE experts, but adapter.method {self.adapter.method!r} "
                    "has none; methods with experts: moe, omoe"
                )
            if self.adapter.num_experts < 2:
                raise ConfigError("optim.optimizer 'orthogonal' needs adapter.num_experts >= 2")
            if self.fsdp:
                raise ConfigError(ORTHOGONAL_FSDP)

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return options.build(cls, data)

    def to_dict(self) -> dict:
        return options.to_dict(self)

    def to_yaml(self, header: str | None = None) -> str:
        return options.to_yaml(self, header)


def load_config(path: str | Path | None = None, overrides: dict[str, object] | None = None) -> TrainConfig:
    """Read a YAML file (or start from the defaults) and apply ``{dotted key: value}`` overrides."""
    data = options.read_yaml(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        options.set_dotted(data, TrainConfig, key, value)
    return TrainConfig.from_dict(data)
