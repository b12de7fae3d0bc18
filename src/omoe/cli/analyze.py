"""``omoe analyze``: expert diversity of trained adapters on a task's test prompts.

Examples::

    omoe analyze --adapter runs/experiments/x/omoe_lora__multi__seed0 --task ARC-Easy
    omoe analyze --adapter runs/moe_soft --adapter runs/mixlora --adapter runs/omoe --task boolq \\
        --layers 0,14,29 --tokens 1024 --output runs/analysis/boolq

Per adapter and layer: mean pairwise cosine similarity between the experts' representations (raw,
and as mixed: after Gram-Schmidt for OMoE), their effective rank, routing entropy and expert load;
a t-SNE figure coloured by expert with the adapters side by side. Writes analysis.json,
summary.md and tsne.png into --output.
"""

from __future__ import annotations

import argparse

from omoe import options
from omoe.analysis import AnalysisSpec, analyze, summary_table
from omoe.utils import quiet_transformers


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="expert diversity (cosine, effective rank), routing and t-SNE of trained MoE adapters",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    options.add_config_arguments(
        parser, AnalysisSpec, aliases={"adapter": "adapters"},
        negations={"no-tsne": "tsne", "no-progress": "progress"},
    )  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = options.build(AnalysisSpec, options.config_data(args, AnalysisSpec))
    if not spec.progress:
        quiet_transformers()
    result = analyze(spec)
    print(summary_table(result))
    written = ["analysis.json", "summary.md"] + (["tsne.png"] if result["figure"] else [])
    print(
        f"\nwall time {result['wall_seconds']:.1f} s; wrote "
        + ", ".join(f"{spec.output}/{f}" for f in written)
    )
    return 0
