"""Training-step and evaluation benchmark: frozen base, our LoRA, PEFT's LoRA and our default OMoE.

``python -m omoe.bench`` or ``omoe bench``. Every variant runs on the same base weights (adapters
are injected, measured, then unloaded), with the same batch and optimizer (AdamW) and the trainer's
own loss (:func:`omoe.train.loop.token_loss_sum`: logits only at the supervised positions, the
last ``--response`` tokens of each row), under ``--precision`` (default ``auto``), so the printed
ratios compare like with like. One more row, ``omoe-full-logits``, is the default OMoE's step as
the trainer ran it before (all ``(B, T, vocab)`` logits, fp32 on CPU, bf16 autocast on CUDA): the
baseline of the speed-up. Variants take turns round after round; a variant's time is the median
over rounds of its median over timed steps after warm-up (and the fastest step, for reference).

The label protocol's evaluation is timed the same way on the same prompts of the default OMoE: as
it was (full logits, the old precision) and as it is (:func:`omoe.eval.label.next_token_scores`:
the last position's logits, ``--precision``).

Memory is reported two ways:
- ``saved MiB``: bytes of the tensors autograd keeps for backward during one forward (counted
  with ``saved_tensors_hooks``, unique storages), a device-independent activation measure;
- ``peak MiB`` (CUDA only): ``torch.cuda.max_memory_allocated`` over the timed steps, weights
  included; the issue's targets are stated against it.
"""

from __future__ import annotations

# The package: variants.py (the rows and the adapter each injects), step.py (one variant's timed
# training step), label.py (the label evaluation, timed), run.py (one run: rounds and medians),
# table.py (ratios and the printed tables), config.py (BenchConfig and the command).
import argparse

from omoe.bench.config import BenchConfig, add_arguments, main_from_args, measure
from omoe.bench.label import bench_label_eval
from omoe.bench.run import run
from omoe.bench.step import bench_variant, full_logits_loss_sum, response_labels
from omoe.bench.table import RATIOS, format_table, ratios
from omoe.bench.variants import (
    ALL_TARGETS,
    BASELINE,
    VARIANTS,
    EvalResult,
    Result,
    Variant,
    old_autocast_dtype,
)

__all__ = [
    "ALL_TARGETS", "BASELINE", "RATIOS", "VARIANTS", "BenchConfig", "EvalResult", "Result", "Variant",
    "add_arguments", "bench_label_eval", "bench_variant", "format_table", "full_logits_loss_sum", "main",
    "main_from_args", "measure", "old_autocast_dtype", "ratios", "response_labels", "run",
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """``python -m omoe.bench``: the same command as ``omoe bench``."""
    parser = argparse.ArgumentParser(prog="python -m omoe.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return main_from_args(parser.parse_args(argv))
