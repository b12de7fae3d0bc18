"""``omoe eval``: accuracy on the commonsense tasks with one of three (non-comparable) protocols.

Example::

    omoe eval --model smollm2-135m-instruct --tasks ARC-Easy,boolq --protocol generate --limit 40 \\
        --output runs/eval.json

Writes ``runs/eval.json`` and ``runs/eval.predictions.jsonl`` (atomically, only when every task has
been evaluated) and prints a Markdown table. The options are the fields of
:class:`omoe.eval.run.EvalSpec`, with its help texts (also from ``--config FILE.yaml``), plus
``--output`` and ``--no-progress``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omoe import options
from omoe.errors import ConfigError
from omoe.eval.evaluate import PROTOCOLS
from omoe.eval.report import markdown_table, predictions_path, write_results
from omoe.eval.run import EvalSpec, load_records_for, run_eval


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model (and adapter) on commonsense tasks",
        description="Evaluate on the LLM-Adapters commonsense tasks. Protocols: "
        "generate (LLM-Adapters: greedy generation + first regex match), label (next-token logits of the "
        "label tokens), loglik (lm-eval: log-likelihood of each choice text). Their numbers are not comparable.",
    )
    options.add_config_arguments(parser, EvalSpec)
    parser.add_argument("--output", help="results JSON; predictions go to <stem>.predictions.jsonl beside it")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    data = options.config_data(args, EvalSpec)
    if data.get("protocol") is None:  # no default: the protocols' numbers are not comparable
        raise ConfigError(f"--protocol is required; one of: {', '.join(PROTOCOLS)}")
    if args.output is None:
        raise ConfigError("--output FILE.json is required")
    output = Path(args.output)
    for path in (output, predictions_path(output)):
        if path.is_dir():
            raise ConfigError(f"--output {path} is a directory; give a file name such as results.json")
    spec = options.build(EvalSpec, data)
    task_records = load_records_for(spec)  # fail on bad data before the model is loaded
    results, predictions = run_eval(spec, progress=not args.no_progress, task_records=task_records)
    results_path, preds_path = write_results(output, results, predictions)
    print(markdown_table(list(results["tasks"].values())))
    print(f"\nwall time {results['wall_seconds']:.1f} s; wrote {results_path} and {preds_path}")
    return 0
