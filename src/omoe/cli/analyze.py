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

from omoe.analysis import AnalysisSpec, analyze, summary_table
from omoe.errors import ConfigError
from omoe.utils import quiet_transformers


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="expert diversity (cosine, effective rank), routing and t-SNE of trained MoE adapters",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add = parser.add_argument
    add("--adapter", action="append", required=True, metavar="DIR", help="saved adapter (repeat to compare)")
    add("--task", required=True, help="task whose test prompts are run through the model")
    add("--layers", help="comma-separated block indices (default: first, middle and last MoE block)")
    add("--tokens", type=int, default=512, help="analyse at least this many prompt tokens (whole prompts)")
    add(
        "--output",
        default="runs/analysis",
        metavar="DIR",
        help="where analysis.json, summary.md, tsne.png go",
    )
    add("--model", help="base model for every adapter (default: the one each adapter was trained on)")
    add("--split", help="bundled split of the task (default: test, or sample where only one ships)")
    add("--batch-size", type=int, default=8, help="prompts per forward pass")
    add(
        "--view",
        default="mixed",
        help="t-SNE of the 'mixed' (orthonormalised for OMoE) or 'raw' representations",
    )
    add("--tsne-points", type=int, default=600, help="points per t-SNE panel (a seeded subsample)")
    add("--no-tsne", action="store_true", help="skip the t-SNE figure (no matplotlib/scikit-learn needed)")
    add("--seed", type=int, default=0, help="seeds the subsample and t-SNE")
    add("--device", default="cpu", help="cpu, cuda, cuda:0, ...")
    add("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.no_progress:
        quiet_transformers()

    layers = None
    if args.layers:
        try:
            layers = [int(b) for b in args.layers.split(",") if b.strip()]
        except ValueError:
            raise ConfigError(
                f"--layers must be comma-separated block indices, got {args.layers!r}"
            ) from None
    spec = AnalysisSpec(
        adapters=args.adapter, task=args.task, layers=layers, tokens=args.tokens, output=args.output,
        model=args.model, split=args.split, batch_size=args.batch_size, view=args.view, tsne=not args.no_tsne,
        tsne_points=args.tsne_points, seed=args.seed, device=args.device, progress=not args.no_progress,
    )  # fmt: skip
    result = analyze(spec)
    print(summary_table(result))
    written = ["analysis.json", "summary.md"] + (["tsne.png"] if result["figure"] else [])
    print(
        f"\nwall time {result['wall_seconds']:.1f} s; wrote "
        + ", ".join(f"{args.output}/{f}" for f in written)
    )
    return 0
