"""Paper-shaped tables from experiment results: Markdown, CSV and (Fig. 4) a PNG.

Tables (the OMoE paper's numbering):

- ``1``: single-task accuracy, rows = methods, columns = tasks + Avg, with #params;
- ``2``: single- vs multi-task, per method a single row, a multi row and their difference;
- ``3``: efficiency, from the JSON of ``omoe bench --table3``;
- ``4``: layer-wise OMoE (the paper's Tables 4-5), rows = ``adapter.orthogonal_layers``;
- ``10``: rank sweep, rows = method x ``adapter.r``, with #params;
- ``fig4``: mean accuracy against a swept key (default: the number of experts), one line per
  method and routing;
- ``answers``: per row and task, the share of test records given the most frequent prediction, beside
  the share of the most frequent gold answer: 100% means a constant answer, whose accuracy is only the
  label balance (read from each cell's answer counts, or from its predictions file when older results
  lack them);
- ``runs``: one row per cell with its wall times (load, train, eval) and hardware, and the totals;
- ``paired``: a reference method (default: the first OMoE row) minus each other method on the same
  test records, per-record results pooled over the seeds both have, with a 95% paired bootstrap
  interval over the records: accuracy, and the gold label's log-probability (``label`` protocol);
- ``logprob``: the mean gold-label log-probability per row and task, mean ± std over seeds.

``paired`` and ``logprob`` read each cell's records file (``<cell>.records.json.gz``, see
:mod:`omoe.experiment.stats`), or its predictions file when older results lack one; cells with
neither read ``n/a``.

Every accuracy is the mean over seeds with the sample standard deviation (n - 1), in percent; one
seed is written ``±0.0 (1 seed)``, and a row with fewer seeds than the table says how many it has.
The Avg column is computed per seed (mean over the tasks) and then averaged, over the seeds that
have every task. Every table names its evaluation protocol.

A report covers one prompt format (``eval.prompt`` of each cell; results without it are ``alpaca``):
results that mix formats need ``--prompt``, so no column ever holds two formats. The tables of a
format other than alpaca say so in their first line and are written as ``<table>-<format>.md``.
"""

from omoe.experiment.report.accuracy import table1, table2, table4, table10
from omoe.experiment.report.build import TABLES, available_tables, build_tables, write_tables
from omoe.experiment.report.efficiency import table3
from omoe.experiment.report.goldprob import logprob
from omoe.experiment.report.loading import BENCH_KIND, Results, cell_records, load_results
from omoe.experiment.report.paired import paired
from omoe.experiment.report.records import reference_row
from omoe.experiment.report.rows import Row, Table, format_mean_std, group, mean_std, method_row
from omoe.experiment.report.spread import answer_counts, answers
from omoe.experiment.report.sweep import fig4
from omoe.experiment.report.walltime import runs

__all__ = [
    "BENCH_KIND",
    "TABLES",
    "Results",
    "Row",
    "Table",
    "answer_counts",
    "answers",
    "available_tables",
    "build_tables",
    "cell_records",
    "fig4",
    "format_mean_std",
    "group",
    "load_results",
    "logprob",
    "mean_std",
    "method_row",
    "paired",
    "reference_row",
    "runs",
    "table1",
    "table2",
    "table3",
    "table4",
    "table10",
    "write_tables",
]
