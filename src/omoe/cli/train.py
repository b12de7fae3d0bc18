"""``omoe train``: fine-tune an adapter as one YAML config says, with ``--key value`` overrides.

Examples::

    omoe train --config configs/fast.yaml
    omoe train --config configs/paper.yaml --adapter.method lora --optim.lr 3e-4 --output_dir runs/lora
    omoe train --config configs/fast.yaml --data-file my.json --task boolq
    omoe train --config configs/fast.yaml --prompt moe-peft    # MoE-PEFT's wording, label-token target
    omoe train --config configs/fast.yaml --resume            # continue from the newest checkpoint
    torchrun --nproc_per_node 2 -m omoe.cli.main train --config configs/fast.yaml

Every key of the config is also a flag (``--section.key``); ``--print-config`` shows the resolved
config as commented YAML and exits.
"""

from __future__ import annotations

import argparse
import os

from omoe import options
from omoe.train.config import TrainConfig, load_config
from omoe.train.trainer import train

ALIASES = {
    "data-file": "data.data_file",
    "task": "data.task",
    "tasks": "data.tasks",
    "prompt": "data.prompt",
    "output-dir": "output_dir",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune an adapter (lora/dora/moe/omoe) from a YAML config",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config", metavar="FILE.yaml", help="YAML config (see configs/); keys not in it keep their defaults"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in output_dir from its newest checkpoint"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    options.add_arguments(parser, TrainConfig, ALIASES)
    options.one_line_errors(parser, "omoe train", TrainConfig)
    parser.set_defaults(func=run)


def resolve(args: argparse.Namespace) -> TrainConfig:
    return load_config(args.config, options.overrides_from_args(args, TrainConfig))


def run(args: argparse.Namespace) -> int:
    config = resolve(args)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    result = train(config, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    print(f"trained {result.steps} steps (final loss {loss}); adapter in {result.output_dir}")
    return 0
