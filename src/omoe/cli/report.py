"""``omoe report``: the paper's tables from experiment results, as Markdown, CSV and PNG.

Examples::

    omoe report --results results/table1_single_task                   # every table it can fill
    omoe report --results results/fig4_k_routing --table fig4 --output docs/results/fig4
    omoe report --results docs/bench/table3.json --table 3             # from omoe bench --table3

Tables: 1 (single-task), 2 (single vs multi-task), 3 (efficiency), 4 (layer-wise, the paper's
Tables 4-5), 10 (rank), fig4 (accuracy against the number of experts, one line per routing),
answers (share of the most frequent prediction per task: is a model answering the same thing to all?),
runs (wall time and hardware of every cell), paired (a reference method minus each other method on the
same test records, pooled over seeds, with 95% bootstrap intervals: accuracy and the gold label's
log-probability), logprob (mean gold-label log-probability, label protocol).
Accuracies are mean ± sample std over seeds, in percent; every table names its protocol. A report
covers one prompt format: results that mix alpaca and moe-peft cells need --prompt.

    omoe report --results results/smollm2-table2_multi_task --table paired --reference lora_r16
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omoe.experiment.report import build_tables, load_results, write_tables


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="paper-shaped tables (Markdown, CSV, PNG) from omoe experiment results",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--results", required=True, metavar="PATH",
        help="results/<experiment> directory of result JSONs, or one JSON file (e.g. of omoe bench --table3)",
    )  # fmt: skip
    parser.add_argument(
        "--table", action="append", metavar="T",
        help="1, 2, 3, 4, 10, fig4, answers, runs, paired or logprob (repeatable or comma-separated; default: every "
        "table the results fill)",
    )  # fmt: skip
    parser.add_argument("--output", metavar="DIR", help="where the files go (default: the results directory)")
    parser.add_argument("--x", dest="x_key", metavar="KEY", help="fig4's x axis (default: adapter.num_experts "
                        "or adapter.top_k, whichever is swept)")  # fmt: skip
    parser.add_argument("--prompt", metavar="FORMAT", help="report the cells of this prompt format only "
                        "(alpaca or moe-peft); needed when the results mix formats")  # fmt: skip
    parser.add_argument("--reference", metavar="NAME", help="the paired table's reference: a method name or a row "
                        "label (default: the first method whose adapter is OMoE)")  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    results = load_results(args.results, args.prompt)
    which = [t.strip() for spec in args.table or [] for t in spec.split(",") if t.strip()]
    tables = build_tables(results, which or None, args.x_key, args.reference)
    source = Path(args.results)
    output = Path(args.output) if args.output else (source if source.is_dir() else source.parent)
    written = write_tables(tables, output)
    print("\n\n".join(t.markdown for t in tables))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0
