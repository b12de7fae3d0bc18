"""``omoe params``: count an adapter's trainable parameters on any model shape, instantly.

The model is built on the ``meta`` device (no memory, no weights), so a 70B shape takes a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field

import torch

from omoe import get_omoe_model, options
from omoe.config import OMoEConfig
from omoe.errors import ConfigError
from omoe.models.shapes import SHAPES, get_shape

# The methods compared in the paper, on one line each.
BASELINES = {
    "LoRA r16": dict(method="lora"),
    "LoRA r80 (MixLoRA budget)": dict(method="lora", r=80, alpha=160),
    "DoRA r16": dict(method="dora"),
    "DoRA r80 (the paper's Table 8)": dict(method="dora", r=80, alpha=160),
    "MoE soft k=2": dict(method="moe"),
    "MixLoRA top-2 of 8": dict(method="moe", num_experts=8, top_k=2),
    "OMoE-LoRA soft k=2": dict(),
    "OMoE-DoRA soft k=2": dict(use_dora=True),
}


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@dataclass
class ParamsConfig:
    """What ``omoe params`` counts."""

    shape: str = field(default="llama2-7b", metadata={"help": f"model shape: {', '.join(SHAPES)} (or --model)"})
    model: str | None = field(
        default=None, metadata={"help": "a local Hugging Face model directory (its config.json)"}
    )
    set: list[str] = field(
        default_factory=list,
        metadata={
            "help": "an OMoEConfig field as KEY=VALUE, e.g. --set method=moe --set num_experts=8 --set top_k=2 "
            "(repeatable); without it, every baseline of the paper is counted",
            "repeat": True,
        },
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser("params", help=__doc__.splitlines()[0], description=__doc__)
    options.add_config_arguments(parser, ParamsConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = options.build(ParamsConfig, options.config_data(args, ParamsConfig))
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.model:
        config = AutoConfig.from_pretrained(spec.model, local_files_only=True)
        name = spec.model
    else:
        config = get_shape(spec.shape).llama_config()
        name = spec.shape
    fields = {f.name for f in dataclasses.fields(OMoEConfig)}
    overrides = {}
    for item in spec.set:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ConfigError(
                f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(fields))}"
            )
        overrides[key] = _parse_value(value)
    adapters = {k: OMoEConfig(**v) for k, v in ({"custom": overrides} if overrides else BASELINES).items()}
    rows = []
    for label, adapter in adapters.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        base = sum(p.numel() for p in model.parameters())
        trainable, _ = get_omoe_model(model, adapter).get_nb_trainable_parameters()
        rows.append(f"| {label} | {trainable:,d} | {100 * trainable / base:.3f} |")
    print(f"Trainable parameters on {name} ({config.num_hidden_layers} blocks, built on the meta device)\n")
    print("| adapter | trainable | % of base |\n|---|---:|---:|\n" + "\n".join(rows))
    return 0
