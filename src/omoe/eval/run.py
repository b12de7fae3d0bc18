"""Whole evaluation runs: several tasks, one protocol, an optional adapter, one results record."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch
import yaml

from omoe import OMoEModel
from omoe.data.loader import bundled_file, load_task
from omoe.data.prompts import PROMPT_FORMATS, render_many
from omoe.data.tasks import TASK_NAMES, Task, get_task, parse_task_list
from omoe.errors import AdapterLoadError, ConfigError
from omoe.eval.evaluate import evaluate, get_protocol
from omoe.models import load_model
from omoe.models.precision import PRECISIONS
from omoe.options import check_int

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class EvalSpec:
    """What to evaluate; validated (and every data file read) before any model is loaded."""

    model: str = field(
        default="smollm2-135m-instruct", metadata={"help": "built-in name, .gguf file or HF directory"}
    )
    protocol: str = field(
        default="generate",
        metadata={"help": "generate, label or loglik (accuracies are not comparable across them)"},
    )
    prompt: str = field(
        default="alpaca",
        metadata={
            "help": f"prompt format, one of {', '.join(PROMPT_FORMATS)}: the one the model was trained with; "
            "moe-peft (MoE-PEFT's wording, label token target) is scored by --protocol label only"
        },
    )
    tasks: str | None = field(
        default=None, metadata={"help": f"comma-separated bundled tasks, from: {','.join(TASK_NAMES)}"}
    )
    task: str | None = field(default=None, metadata={"help": "one task whose records come from --data-file"})
    data_file: str | None = field(
        default=None, metadata={"help": ".json or .json.gz file of LLM-Adapters records for --task"}
    )
    split: str | None = field(
        default=None,
        metadata={
            "help": "bundled split for --tasks (default: test, or sample where only a sample ships); val = "
            "a seeded slice of the train file that training on 'train' leaves out, for tuning"
        },
    )
    adapter: str | None = field(
        default=None, metadata={"help": "saved omoe adapter directory (adapter_config.json + weights)"}
    )
    limit: int | None = field(
        default=None, metadata={"help": "evaluate only the first N records of each task (file order)"}
    )
    batch_size: int = field(default=8, metadata={"help": "prompts per forward/generate call"})
    seed: int = field(
        default=0, metadata={"help": "torch seed, recorded in the output (greedy decoding does not use it)"}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "generate only: generation length limit"})
    num_beams: int = field(default=1, metadata={"help": "generate only: 1 = greedy"})
    dtype: str | None = field(
        default=None, metadata={"help": "weights: float32 (when not given), bfloat16 or float16"}
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "autocast: auto (bf16 on CUDA and on CPUs with native bf16, else fp32), fp32, bf16, fp16"
        },
    )
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:0, ..."})

    def __post_init__(self) -> None:
        get_protocol(self.protocol, self.max_new_tokens, self.num_beams, self.prompt)
        on_cuda = self.device.startswith("cuda")
        if self.precision not in PRECISIONS or (self.precision == "fp16" and not on_cuda):
            allowed = PRECISIONS if on_cuda else ("auto", "fp32", "bf16")
            raise ConfigError(
                f"--precision {self.precision} is not allowed on {self.device}; allowed: {', '.join(allowed)}"
            )
        if (self.tasks is None) == (self.task is None):
            raise ConfigError("give either --tasks t1,t2 (bundled data) or --task T --data-file F")
        if self.task is not None and self.data_file is None:
            raise ConfigError("--task needs --data-file (use --tasks for the bundled data)")
        if self.data_file is not None and self.task is None:
            raise ConfigError("--data-file needs --task to say which task's labels it holds")
        if self.data_file is not None and self.split is not None:
            raise ConfigError("--split applies to bundled data (--tasks), not to --data-file")
        for key in ("limit", "batch_size"):
            check_int(f"--{key.replace('_', '-')}", getattr(self, key), 1, nullable=key == "limit")
        if self.adapter is not None:
            adapter = Path(self.adapter)
            if not adapter.is_dir():
                raise FileNotFoundError(f"adapter directory not found: {adapter}")
            if not (adapter / ADAPTER_CONFIG).is_file():
                raise FileNotFoundError(f"{adapter} has no {ADAPTER_CONFIG}; expected a saved omoe adapter")
            trained = trained_prompt(adapter)
            if trained is not None and trained != self.prompt:
                raise ConfigError(
                    f"the adapter in {adapter} was trained with prompt format {trained!r}; evaluate it with "
                    f"--prompt {trained} (got {self.prompt!r})"
                )

    def task_list(self) -> list[Task]:
        return [get_task(self.task)] if self.task is not None else parse_task_list(self.tasks)


def trained_prompt(adapter: str | Path) -> str | None:
    """The prompt format the adapter's training run used, from the ``train_config.yaml`` that
    ``omoe train`` writes beside it (runs from before the option: alpaca); None without that file."""
    path = Path(adapter) / "train_config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return None  # not ours to judge here; the adapter itself is checked on loading
    prompt = (data.get("data") or {}).get("prompt", "alpaca") if isinstance(data, dict) else None
    return prompt if isinstance(prompt, str) else None


def read_adapter_config(adapter: str | Path) -> dict:
    path = Path(adapter) / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AdapterLoadError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None


def load_adapter(model, adapter: str | Path):
    """Wrap ``model`` with a saved adapter (frozen, for evaluation)."""
    return OMoEModel.from_pretrained(model, str(adapter), is_trainable=False)


def load_records_for(spec: EvalSpec) -> list[tuple[Task, str, list[dict]]]:
    """``(task, source, records)`` per task, records cut to ``spec.limit``; the source is the file,
    followed by the split in brackets where the split is a part of it (``.../train.json.gz [val]``)."""
    out = []
    for task in spec.task_list():
        if spec.data_file is not None:
            source = str(spec.data_file)
            records = load_task(task, data_file=spec.data_file, limit=spec.limit)
        else:
            split = spec.split or task.eval_split
            source = str(bundled_file(task, split))
            if split not in task.files:
                source += f" [{split}]"
            records = load_task(task, split, limit=spec.limit)
        render_many(records, task, spec.prompt)  # a record the format cannot word fails before loading
        out.append((task, source, records))
    return out


def run_eval(
    spec: EvalSpec, progress: bool = True, task_records: list[tuple[Task, str, list[dict]]] | None = None
) -> tuple[dict, list[dict]]:
    """Load data (first, so bad input fails fast), model and adapter, and evaluate every task.

    ``task_records`` is :func:`load_records_for`'s result, if the caller has already read the data.

    Returns:
        ``(results, predictions)``: the JSON-ready summary and all tasks' per-example predictions.
    """
    start = time.perf_counter()
    if task_records is None:
        task_records = load_records_for(spec)
    adapter_config = read_adapter_config(spec.adapter) if spec.adapter else None

    model, tokenizer = load_model(spec.model, dtype=spec.dtype, device=spec.device)
    if spec.adapter:
        model = load_adapter(model, spec.adapter)
    load_seconds = time.perf_counter() - start

    torch.manual_seed(spec.seed)
    per_task, predictions = {}, []
    for task, source, records in task_records:
        metrics, preds = evaluate(
            model,
            tokenizer,
            task,
            records,
            spec.protocol,
            spec.batch_size,
            max_new_tokens=spec.max_new_tokens,
            num_beams=spec.num_beams,
            progress=progress,
            precision=spec.precision,
            prompt=spec.prompt,
        )
        metrics["data_file"] = source
        per_task[task.name] = metrics
        predictions.extend(preds)

    results = {
        "protocol": spec.protocol,
        "prompt": spec.prompt,
        "note": "accuracies from different protocols (generate / label / loglik) or prompt formats are not comparable",
        "model": spec.model,
        "adapter": str(Path(spec.adapter).resolve()) if spec.adapter else None,
        "adapter_config": adapter_config,
        "seed": spec.seed,
        "limit": spec.limit,
        "batch_size": spec.batch_size,
        "dtype": spec.dtype or "float32",
        "precision": spec.precision,  # as asked; each task's metrics record the autocast used
        "device": spec.device,
        "tasks": per_task,
        "load_seconds": round(load_seconds, 3),
        "wall_seconds": round(time.perf_counter() - start, 3),
        "versions": versions(),
    }
    return results, predictions


def versions() -> dict:
    """Versions of omoe, torch, transformers and Python, recorded in every results file."""
    import transformers

    try:
        omoe_version = version("omoe")
    except Exception:  # not installed as a distribution
        omoe_version = None
    return {
        "omoe": omoe_version,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
