"""``omoe quickstart``: evaluate, fine-tune with OMoE, evaluate again, on 2 CPU cores.

On the bundled SmolLM2-135M-Instruct, in the paper's protocol (MoE-PEFT's per-task prompt, one label
token as the answer, scored by the labels' next-token logits at the last position): accuracy on the
first test records of a task, then a fine-tune with ``OMoEConfig()``'s experts on the task's train
split, then the same evaluation with the adapter. It prints, per task, the majority rate, accuracy
before and after, the gain with a 95% paired bootstrap interval (records resampled; the same records
before and after) and the answer spread (share of the most frequent answer), and writes everything
under ``output_dir``. Threads are fixed (``threads``) so that the same command gives the same numbers
on another machine of the same kind.

To fit 2 CPU cores the adapters sit on the top blocks only (``layers``); the frozen blocks below are
computed once per sequence and shared by both evaluations and every epoch (``omoe.models.prefix``).
``--prompt alpaca`` trains and evaluates in LLM-Adapters' format instead (``generate`` protocol).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from omoe import options
from omoe.config import OMoEConfig
from omoe.data.loader import load_task
from omoe.data.tasks import get_task
from omoe.errors import ConfigError
from omoe.eval.evaluate import evaluate, get_protocol
from omoe.eval.report import write_results
from omoe.experiment.stats import RESAMPLES, SEED, bootstrap_means, percentile_interval
from omoe.models import load_model
from omoe.models.prefix import frozen_prefix
from omoe.train.config import TrainConfig
from omoe.train.trainer import train
from omoe.utils import atomic_write_text, json_text

QUICKSTART_TASKS = ("ARC-Easy",)
DEFAULT_PROTOCOL = {"alpaca": "generate", "moe-peft": "label"}  # each format's own paper protocol
# The default budget: what fits 15 minutes on 2 CPU cores, set-up included. No budget that fits has
# yet taught the bundled model this task in this protocol (docs/pilot/README.md), so the gain printed
# is expected to be near zero; the interval says whether it is.
QUICKSTART_STEPS = 300
QUICKSTART_LR = 1e-3
QUICKSTART_LAYERS = "22-29"


@dataclass
class QuickstartConfig:
    """Sizes of the quickstart run (defaults: about 10 minutes on 2 CPU cores)."""

    model: str = field(
        default="smollm2-135m-instruct",
        metadata={"help": "base model: built-in name, .gguf file or local Hugging Face directory"},
    )
    output_dir: str = field(
        default="runs/quickstart",
        metadata={"help": "results go here; its adapter/ subdirectory is replaced on each run"},
    )
    tasks: list[str] = field(
        default_factory=lambda: list(QUICKSTART_TASKS),
        metadata={
            "help": "tasks to train on (their train splits) and evaluate (their test splits; social_i_qa and "
            "winogrande: their 50-record samples)"
        },
    )
    prompt: str = field(
        default="moe-peft",
        metadata={"help": "prompt format of training and evaluation: alpaca (LLM-Adapters) or moe-peft"},
    )
    protocol: str | None = field(
        default=None,
        metadata={"help": "evaluation protocol; null = generate with prompt alpaca, label with moe-peft"},
    )
    eval_limit: int = field(default=500, metadata={"help": "evaluate the first N test records of each task"})
    train_per_task: int = field(
        default=100_000,
        metadata={
            "help": "training records per task: a seeded random subset of its train split (all if fewer)"
        },
    )
    max_steps: int = field(default=QUICKSTART_STEPS, metadata={"help": "optimizer steps of the fine-tune"})
    layers: str = field(
        default=QUICKSTART_LAYERS,
        metadata={
            "help": "blocks that get adapters (adapter.layers); the frozen ones below are computed once"
        },
    )
    global_batch_size: int = field(default=8, metadata={"help": "examples per optimizer step"})
    micro_batch_size: int = field(default=4, metadata={"help": "examples per forward/backward"})
    lr: float = field(
        default=QUICKSTART_LR,
        metadata={"help": "peak learning rate (higher than the paper's 2e-4: the run is far shorter)"},
    )
    warmup_steps: int = field(default=20, metadata={"help": "linear warmup steps, then linear decay"})
    cutoff_len: int = field(default=256, metadata={"help": "max tokens per training example"})
    eval_batch_size: int = field(default=16, metadata={"help": "prompts per forward or generate call"})
    max_new_tokens: int = field(
        default=32, metadata={"help": "generation length limit of the evaluation (LLM-Adapters: 32)"}
    )
    seed: int = field(default=0, metadata={"help": "seeds the training subset, its order and the adapter"})
    threads: int = field(
        default=2,
        metadata={"help": "CPU threads (fixed, so that the numbers do not depend on the core count)"},
    )
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("tasks must name at least one task")
        for name in self.tasks:
            task = get_task(name)
            if "train" not in task.splits:
                raise ConfigError(
                    f"task {name} has no bundled train split; use e.g. {', '.join(QUICKSTART_TASKS)}"
                )
        for key in ("eval_limit", "train_per_task", "max_steps", "global_batch_size", "micro_batch_size",
                    "cutoff_len", "eval_batch_size", "max_new_tokens", "threads"):  # fmt: skip
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.protocol is None:
            self.protocol = DEFAULT_PROTOCOL.get(self.prompt, "generate")
        get_protocol(self.protocol, **self.generation(), prompt=self.prompt)
        OMoEConfig(layers=self.layers)  # the layers syntax, checked now

    def generation(self) -> dict:
        """Generation options of :func:`omoe.eval.evaluate` (generate protocol only)."""
        return {"max_new_tokens": self.max_new_tokens} if self.protocol == "generate" else {}

    def train_config(self):
        """The :class:`~omoe.train.TrainConfig` of the fine-tune (default ``OMoEConfig()`` adapter)."""
        return TrainConfig.from_dict(
            {
                "model": self.model,
                "output_dir": str(Path(self.output_dir) / "adapter"),
                "seed": self.seed,
                "device": "cpu",
                "data": {
                    "tasks": list(self.tasks),
                    "limit": self.train_per_task,
                    "cutoff_len": self.cutoff_len,
                    "prompt": self.prompt,
                },
                "optim": {
                    "lr": self.lr,
                    "global_batch_size": self.global_batch_size,
                    "micro_batch_size": self.micro_batch_size,
                    "max_steps": self.max_steps,
                    "warmup_steps": self.warmup_steps,
                },
                "adapter": {"layers": self.layers},
                "logging": {"progress": self.progress, "tensorboard": False},
            }
        )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="evaluate, fine-tune with OMoE, evaluate again (about 10 min on 2 CPU cores)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    options.add_arguments(parser, QuickstartConfig)
    options.one_line_errors(parser, "omoe quickstart", QuickstartConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = options.build(QuickstartConfig, options.overrides_from_args(args, QuickstartConfig))
    quickstart(config)
    return 0


def quickstart(config: QuickstartConfig, model=None, tokenizer=None) -> dict:
    """Run the quickstart; return the results dict written to ``output_dir/results.json``."""
    start = time.perf_counter()
    train_config = config.train_config()  # validates before anything slow
    test_sets = {t: load_task(t, limit=config.eval_limit) for t in config.tasks}  # each task's eval_split
    torch.set_flush_denormal(True)
    if model is None:
        _say(f"loading {config.model} (the first run converts the GGUF file, ~30 s)")
        model, tokenizer = load_model(config.model)
    load_s = time.perf_counter() - start
    before, result, train_s, after = _evaluate_train_evaluate(
        config, train_config, test_sets, model, tokenizer
    )
    gains = {task: gain(before.predictions, after.predictions, task) for task in config.tasks}
    table = comparison_table(before.metrics, after.metrics, gains)
    seconds = {"load": load_s, "eval_before": before.seconds, "train": train_s, "eval_after": after.seconds,
               "total": time.perf_counter() - start}  # fmt: skip
    results = _results(config, before, after, gains, result, seconds)
    out = Path(config.output_dir)
    atomic_write_text(out / "results.json", json_text(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", table + "\n")
    _print_summary(config, table, results, seconds, Path(train_config.output_dir))
    return results


@dataclass
class _Stage:
    """One evaluation of every task: accuracy per task, the predictions, the seconds it took."""

    metrics: dict
    predictions: list[dict]
    seconds: float


def _evaluate_train_evaluate(config: QuickstartConfig, train_config, test_sets: dict, model, tokenizer):
    """Evaluate the base model, fine-tune it, evaluate the fine-tuned one, on ``config.threads``
    threads; return (before, train result, train seconds, after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    # the frozen blocks below the adapters: computed once per sequence, shared by both evaluations
    # and every training epoch (omoe.models.prefix)
    blocks = model.config.num_hidden_layers
    with frozen_prefix(model, min(train_config.adapter.adapted_blocks(blocks))), _restore_threads(threads):
        _say(f"evaluating the base model on {config.eval_limit} test records of {', '.join(config.tasks)}")
        before = _evaluate_stage(config, model, tokenizer, test_sets, "before")

        adapter_dir = Path(train_config.output_dir)
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)  # quickstart's own directory from an earlier run
        _say(f"fine-tuning OMoE for {config.max_steps} steps of {config.global_batch_size} examples")
        t0 = time.perf_counter()
        result = train(train_config, model=model, tokenizer=tokenizer)
        train_s = time.perf_counter() - t0

        _say("evaluating the fine-tuned model")
        after = _evaluate_stage(config, result.model, tokenizer, test_sets, "after")
    return before, result, train_s, after


def _evaluate_stage(config: QuickstartConfig, model, tokenizer, test_sets: dict, stage: str) -> _Stage:
    """Evaluate every task; write ``output_dir/<stage>.json`` and its predictions."""
    t0 = time.perf_counter()
    metrics, predictions = {}, []
    for task, records in test_sets.items():
        metrics[task], preds = evaluate(
            model, tokenizer, task, records, config.protocol, config.eval_batch_size,
            progress=config.progress, prompt=config.prompt, **config.generation(),
        )  # fmt: skip
        predictions.extend(preds)
        _say(
            f"{stage}: {task} accuracy {metrics[task]['accuracy']:.3f}, no-match {metrics[task]['no_match']}/{metrics[task]['n']}"
        )
    results = {"stage": stage, "model": config.model, "protocol": config.protocol, "prompt": config.prompt,
               "tasks": metrics}  # fmt: skip
    write_results(Path(config.output_dir) / f"{stage}.json", results, predictions)
    return _Stage(metrics, predictions, time.perf_counter() - t0)


def _results(
    config: QuickstartConfig, before: _Stage, after: _Stage, gains: dict, result, seconds: dict
) -> dict:
    """``results.json``: the config, accuracy before and after, the gains, the run and its seconds."""
    return {
        "model": config.model,
        "protocol": config.protocol,
        "prompt": config.prompt,
        "config": options.to_dict(config),
        "before": before.metrics,
        "after": after.metrics,
        "gain": gains,
        "threads": config.threads,
        "train": {
            "steps": result.steps,
            "examples": result.num_examples,
            "truncated": result.num_truncated,
            "first_loss": result.history[0]["loss"] if result.history else None,
            "final_loss": result.final_loss,
        },
        "seconds": {key: round(value, 1) for key, value in seconds.items()},
    }


def _print_summary(
    config: QuickstartConfig, table: str, results: dict, seconds: dict, adapter_dir: Path
) -> None:
    """The table, what its columns mean, the loss and times, and where everything went."""
    out = Path(config.output_dir)
    print(table)
    print(
        "\ngain: accuracy after - before on the same records, with a 95% paired bootstrap interval "
        f"({RESAMPLES:,} resamples); majority: the most frequent gold answer's share; top answer: the share "
        "of the most frequent prediction (1.00 = the same answer to every record)"
    )
    run, s = results["train"], seconds
    print(
        f"\ntraining loss {run['first_loss']:.3f} -> {run['final_loss']:.3f} over {run['steps']} steps; "
        f"wall time {s['total'] / 60:.1f} min (load {s['load']:.0f} s, eval {s['eval_before']:.0f} + "
        f"{s['eval_after']:.0f} s, train {s['train']:.0f} s)"
    )
    print(f"adapter: {adapter_dir}")
    print(
        f"results: {out / 'results.json'}, {out / 'results.md'}; predictions: {out}/before.predictions.jsonl, {out}/after.predictions.jsonl"
    )
    print(
        f"evaluate it again: omoe eval --adapter {adapter_dir} --tasks {','.join(config.tasks)} "
        f"--protocol {config.protocol} --prompt {config.prompt} --limit {config.eval_limit} --output {out / 'eval.json'}"
    )


def gain(before: list[dict], after: list[dict], task: str) -> dict:
    """Accuracy after minus before on ``task``'s records with its 95% paired bootstrap interval, the
    majority rate and the share of the most frequent answer before and after."""
    b = {p["index"]: p for p in before if p["task"] == task}
    a = {p["index"]: p for p in after if p["task"] == task}
    if set(a) != set(b):
        raise ConfigError(f"{task}: the before and after evaluations scored different records")
    order = sorted(b)
    diff = np.array([float(a[i]["correct"]) - float(b[i]["correct"]) for i in order])  # (n,) in {-1, 0, 1}
    low, high = percentile_interval(bootstrap_means(diff, RESAMPLES, SEED))

    def top_share(preds: dict) -> float:
        return Counter(p["prediction"] for p in preds.values()).most_common(1)[0][1] / len(preds)

    gold = Counter(b[i]["answer"] for i in order)
    return {
        "n": len(order),
        "gain": float(diff.mean()),
        "low": low,
        "high": high,
        "majority": gold.most_common(1)[0][1] / len(order),
        "top_answer_before": top_share(b),
        "top_answer_after": top_share(a),
    }


def comparison_table(before: dict, after: dict, gains: dict) -> str:
    """Markdown: per task, the majority rate, accuracy before and after, the gain with its 95% paired
    interval, the share of the most frequent answer, and no-match counts (generate protocol)."""
    lines = [
        "| task | n | majority | accuracy before | accuracy after | gain [95% CI] | top answer before -> after "
        "| no-match before -> after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task, b in before.items():
        a, g = after[task], gains[task]
        lines.append(
            f"| {task} | {b['n']} | {g['majority']:.3f} | {b['accuracy']:.3f} | {a['accuracy']:.3f} "
            f"| {g['gain']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}] "
            f"| {g['top_answer_before']:.2f} -> {g['top_answer_after']:.2f} | {b['no_match']} -> {a['no_match']} |"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def _restore_threads(n: int):
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _say(message: str) -> None:
    print(f"omoe quickstart: {message}", file=sys.stderr, flush=True)
