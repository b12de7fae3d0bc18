"""``omoe bench``'s settings (:class:`BenchConfig`: ``--config FILE.yaml`` and ``--key value``) and
the command: run, print the table, write the JSON."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field

import torch

from omoe import options
from omoe.bench.run import run
from omoe.bench.table import format_table
from omoe.bench.variants import VARIANTS
from omoe.errors import ConfigError
from omoe.experiment.efficiency import DEFAULT_METHODS, METHODS, table3_main
from omoe.models.precision import PRECISIONS
from omoe.models.shapes import PRESETS
from omoe.options import check_int
from omoe.utils import atomic_write_text, json_text


@dataclass
class BenchConfig:
    """What ``omoe bench`` measures (``--config FILE.yaml`` and ``--key value``, as every command)."""

    preset: str | None = field(
        default=None, metadata={"help": f"model shape, one of {', '.join(PRESETS)} (default: llama2-7b on CUDA, "
                                "cpu-small otherwise; --table3: smollm2-135m on CPU)"},
    )  # fmt: skip
    variants: str | None = field(
        default=None, metadata={"help": f"comma list from {', '.join(VARIANTS)} (with --table3: from "
                                f"{', '.join(METHODS)})"},
    )  # fmt: skip
    steps: int = field(default=5, metadata={"help": "timed steps per variant"})
    warmup: int = field(default=2, metadata={"help": "untimed steps per variant"})
    batch: int | None = field(default=None, metadata={"help": "sequences per step (preset default)"})
    seq: int | None = field(default=None, metadata={"help": "tokens per sequence (preset default)"})
    r: int = field(default=16, metadata={"help": "LoRA rank of every variant"})
    layers: int | None = field(default=None, metadata={"help": "override the preset's number of blocks"})
    rounds: int = field(default=3, metadata={"help": "variants take turns this many times; medians"})
    threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads (default: torch's); 1 is steadier when other processes share the cores"
        },
    )
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)"})
    precision: str | None = field(
        default=None, metadata={"help": f"autocast of every variant but omoe-full-logits, one of {', '.join(PRECISIONS)} "
                                "(default auto: bf16 on CUDA and on CPUs with native bf16, else fp32)"},
    )  # fmt: skip
    response: int = field(
        default=8,
        metadata={
            "help": "supervised (response) tokens at the end of each row; the loss reads logits only there"
        },
    )
    eval_prompts: int | None = field(
        default=None,
        metadata={"help": "prompts of the label-evaluation timing (default 4 x batch; 0 = skip it)"},
    )
    output: str | None = field(default=None, metadata={"help": "also write the results as JSON to this file"})
    table3: bool = field(
        default=False,
        metadata={"help": "measure the paper's Table 3 instead: generation latency and extra memory of LoRA, "
                  "DoRA, MoE and OMoE over the base model, one run (random weights)"},
    )  # fmt: skip
    new_tokens: int = field(default=32, metadata={"help": "--table3: tokens generated per prompt"})
    prompt_tokens: int = field(default=64, metadata={"help": "--table3: tokens per prompt (random ids)"})
    model: str | None = field(
        default=None,
        metadata={"help": "--table3: measure this model's real weights (a built-in name such as "
                  "smollm2-135m-instruct, a .gguf file or a local HF directory) instead of random weights"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"unknown --preset {self.preset!r}; allowed: {', '.join(PRESETS)}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ConfigError(f"unknown --precision {self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        allowed, default = (
            (tuple(METHODS), DEFAULT_METHODS) if self.table3 else (tuple(VARIANTS), tuple(VARIANTS))
        )
        chosen = [v.strip() for v in (self.variants or ",".join(default)).split(",") if v.strip()]
        bad = [v for v in chosen if v not in allowed]
        if bad or not chosen:
            raise ConfigError(
                f"unknown variant(s) {', '.join(bad) or '(none)'}; allowed: {', '.join(allowed)}"
            )
        self.variants = ",".join(chosen)
        for name in ("steps", "warmup", "batch", "seq", "r", "layers", "rounds", "threads", "new_tokens",
                     "prompt_tokens", "response", "eval_prompts"):  # fmt: skip
            low = 0 if name in ("warmup", "eval_prompts") else 1
            nullable = name in ("batch", "seq", "layers", "threads", "eval_prompts")  # None: a default
            check_int(f"--{name.replace('_', '-')}", getattr(self, name), low, nullable=nullable)
        if self.model and not self.table3:
            raise ConfigError("--model applies to --table3 only; the training benchmark uses --preset shapes")
        if self.table3 and self.precision is not None:
            raise ConfigError(
                "--precision applies to the training benchmark; --table3 autocasts to bf16 on CUDA only"
            )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_config_arguments(parser, BenchConfig)


def main_from_args(args: argparse.Namespace) -> int:
    return measure(options.build(BenchConfig, options.config_data(args, BenchConfig)))


def measure(args: BenchConfig) -> int:
    """Run the benchmark ``args`` describes, print its table, write ``args.output``."""
    variants = args.variants.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but CUDA is not available; allowed here: cpu")
    on_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if args.precision == "fp16" and not on_cuda:
        raise ConfigError("--precision fp16 needs CUDA; allowed on CPU: auto, fp32, bf16")
    if args.table3:
        return table3_main(args, args.preset or ("llama2-7b" if on_cuda else "smollm2-135m"), variants)
    preset = args.preset or ("llama2-7b" if on_cuda else "cpu-small")
    meta, results, evals, ratio_rows = run(
        preset,
        variants,
        args.steps,
        args.warmup,
        args.r,
        args.device,
        args.batch,
        args.seq,
        layers=args.layers,
        rounds=args.rounds,
        precision=args.precision or "auto",
        response=args.response,
        eval_prompts=args.eval_prompts,
    )
    print(format_table(meta, results, evals, ratio_rows))
    if args.output:
        report = {
            "kind": "omoe.bench.train",
            "meta": meta,
            "results": [asdict(r) for r in results],
            "eval": [asdict(e) for e in evals],
            "ratios": ratio_rows,
        }
        atomic_write_text(args.output, json_text(report, indent=2) + "\n")
    return 0
