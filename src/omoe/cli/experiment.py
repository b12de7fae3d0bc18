"""``omoe experiment``: run one experiment file (a grid of train + evaluate cells), resumably.

Examples::

    omoe experiment --config experiments/smollm2/table1_single_task.yaml --dry-run
    omoe experiment --config experiments/smollm2/table1_single_task.yaml
    omoe experiment --config experiments/smollm2/table1_single_task.yaml --only 'omoe_*' --only lora_r16
    omoe experiment --config experiments/smollm2/table1_single_task.yaml --prompt moe-peft --dry-run

Every finished cell writes ``results/<experiment>/<cell>.json``; run the same command again to
continue a killed sweep (finished cells are skipped, a cell killed mid-training resumes from its
newest checkpoint). ``omoe report --results results/<experiment>`` turns the results into tables.
``--prompt`` sets every cell's prompt format (``base.data.prompt``): the cells train and are scored
in it, and cells of a format other than alpaca carry it in their id (``lora_r16__single-boolq__moe-
peft__seed0``), so both formats can share a results directory.
"""

from __future__ import annotations

import argparse

from omoe.experiment import cell_state, load_experiment, run_experiment
from omoe.utils import quiet_transformers


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "experiment",
        help="run an experiment grid (methods x settings x seeds x sweep) from a YAML file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config", required=True, metavar="FILE.yaml", help="experiment file (see experiments/)"
    )
    parser.add_argument("--dry-run", action="store_true", help="list the cells and their state; run nothing")
    parser.add_argument(
        "--prompt", metavar="FORMAT",
        help="prompt format of every cell, for training and evaluation: alpaca or moe-peft (default: the "
        "file's base.data.prompt, else alpaca); moe-peft is scored by the label protocol only",
    )  # fmt: skip
    parser.add_argument(
        "--only",
        action="append",
        metavar="PATTERN",
        help="run only cells whose id matches: a glob (omoe_*__single-*) or a substring; repeatable",
    )
    parser.add_argument("--results-dir", help="where result JSONs go (default: the file's results_dir, "
                        "else results/<experiment>)")  # fmt: skip
    parser.add_argument("--work-dir", help="where each cell's adapter and checkpoints go (default: the "
                        "file's work_dir, else runs/experiments/<experiment>)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="hide the training and evaluation bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.no_progress:
        quiet_transformers()

    spec = load_experiment(args.config, args.results_dir, args.work_dir, args.prompt)
    cells = spec.select(args.only)
    if args.dry_run:
        print(f"experiment {spec.name}: {len(cells)} of {len(spec.cells)} cells; results in {spec.results_dir}, "
              f"work dirs in {spec.work_dir}")  # fmt: skip
        print("| cell | method | setting | train tasks | eval tasks | sweep | seed | state |")
        print("|---|---|---|---|---|---|---:|---|")
        counts: dict[str, int] = {}
        for cell in cells:
            state = cell_state(spec, cell)
            counts[state.state] = counts.get(state.state, 0) + 1
            sweep = ", ".join(f"{k}={v}" for k, v in cell.sweep.items()) or "–"
            shown = f"{state.state} ({state.detail})" if state.detail else state.state
            print(f"| {cell.id} | {cell.method} | {cell.setting} | {','.join(cell.train_tasks)} | "
                  f"{','.join(cell.eval_tasks)} | {sweep} | {cell.seed} | {shown} |")  # fmt: skip
        print("\n" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
        return 0
    print(f"experiment {spec.name}: {len(cells)} cells; results in {spec.results_dir}", flush=True)
    written = run_experiment(
        spec, args.only, progress=not args.no_progress, echo=lambda m: print(m, flush=True)
    )
    print(f"{len(written)} cell(s) run, {len(cells) - len(written)} already done; "
          f"tables: omoe report --results {spec.results_dir}")  # fmt: skip
    return 0
