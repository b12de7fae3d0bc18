"""Experiments: one YAML file per claim of the OMoE paper, run as a resumable grid of cells
(``omoe experiment``), and the paper-shaped tables built from their results (``omoe report``).

See ``docs/experiments.md``.
"""

from omoe.experiment.runner import RESULT_KIND, cell_state, run_experiment
from omoe.experiment.spec import Cell, EvalOptions, ExperimentSpec, load_experiment

__all__ = [
    "RESULT_KIND",
    "Cell",
    "EvalOptions",
    "ExperimentSpec",
    "cell_state",
    "load_experiment",
    "run_experiment",
]
