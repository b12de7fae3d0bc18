"""``omoe eval``: accuracy on the commonsense tasks with one of three (non-comparable) protocols.

Example::

    omoe eval --model smollm2-135m-instruct --tasks ARC-Easy,boolq --protocol generate --limit 40 \\
        --output runs/eval.json

Writes ``runs/eval.json`` and ``runs/eval.predictions.jsonl`` (atomically, only when every task has
been evaluated) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omoe.data.tasks import TASK_NAMES
from omoe.errors import ConfigError
from omoe.eval.evaluate import PROTOCOLS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model (and adapter) on commonsense tasks",
        description="Evaluate on the LLM-Adapters commonsense tasks. Protocols: "
        "generate (LLM-Adapters: greedy generation + first regex match), label (next-token logits of the "
        "label tokens), loglik (lm-eval: log-likelihood of each choice text). Their numbers are not comparable.",
    )
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="built-in name, .gguf file or HF directory"
    )
    parser.add_argument("--adapter", help="adapter directory (with adapter_config.json) to load on the model")
    parser.add_argument("--tasks", help=f"comma-separated bundled tasks: {','.join(TASK_NAMES)}")
    parser.add_argument("--task", help="one task whose records come from --data-file")
    parser.add_argument("--data-file", help=".json or .json.gz file of LLM-Adapters records for --task")
    parser.add_argument(
        "--split", help="bundled split for --tasks (default: test, or sample where only a sample ships)"
    )
    parser.add_argument("--protocol", help=f"one of: {', '.join(PROTOCOLS)}")
    parser.add_argument("--limit", type=int, help="evaluate only the first N records of each task")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed, recorded in the output (default 0)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, help="generate: max new tokens (default 32)"
    )
    parser.add_argument("--num-beams", type=int, default=1, help="generate: beams (default 1 = greedy)")
    parser.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:0, ...")
    parser.add_argument("--output", help="results JSON; predictions go to <stem>.predictions.jsonl beside it")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    # argparse's own errors print the usage too; keep every error of this command to one line.
    parser.error = lambda message: parser.exit(2, f"omoe eval: error: {message}\n")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from omoe.eval.report import markdown_table, predictions_path, write_results
    from omoe.eval.run import EvalSpec, load_records_for, run_eval

    if args.protocol is None:
        raise ConfigError(f"--protocol is required; one of: {', '.join(PROTOCOLS)}")
    if args.output is None:
        raise ConfigError("--output FILE.json is required")
    output = Path(args.output)
    for path in (output, predictions_path(output)):
        if path.is_dir():
            raise ConfigError(f"--output {path} is a directory; give a file name such as results.json")
    spec = EvalSpec(
        model=args.model,
        protocol=args.protocol,
        tasks=args.tasks,
        task=args.task,
        data_file=args.data_file,
        split=args.split,
        adapter=args.adapter,
        limit=args.limit,
        batch_size=args.batch_size,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        dtype=args.dtype,
        device=args.device,
    )
    task_records = load_records_for(spec)  # fail on bad data before the model is loaded
    results, predictions = run_eval(spec, progress=not args.no_progress, task_records=task_records)
    results_path, preds_path = write_results(output, results, predictions)
    print(markdown_table(list(results["tasks"].values())))
    print(f"\nwall time {results['wall_seconds']:.1f} s; wrote {results_path} and {preds_path}")
    return 0
