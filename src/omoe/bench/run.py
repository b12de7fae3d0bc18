"""One benchmark run: a random LLaMA of a preset's shape, its variants and the label evaluation
timed in turns over rounds, and their medians."""

from __future__ import annotations

import statistics
import sys
from contextlib import nullcontext
from dataclasses import replace

import torch

from omoe.bench.label import bench_label_eval
from omoe.bench.step import bench_variant, response_labels
from omoe.bench.table import ratios
from omoe.bench.variants import VARIANTS, EvalResult, Result, old_autocast_dtype
from omoe.layers.kernels import reference_kernels
from omoe.models.precision import autocast_dtype, precision_name
from omoe.models.shapes import PRESETS
from omoe.models.testing import random_llama


def run(
    preset="cpu-small",
    variants=tuple(VARIANTS),
    steps=5,
    warmup=2,
    r=16,
    device=None,
    batch=None,
    seq=None,
    seed=0,
    layers=None,
    rounds=1,
    precision="auto",
    response=8,
    eval_prompts=None,
):
    """Measure ``variants`` and the label evaluation, ``rounds`` times in turn.

    Returns ``(meta, results, evals, ratios)``: the run's settings, one :class:`Result` per variant,
    one :class:`EvalResult` per label-evaluation run, and issue 10's ratios with their targets.
    """
    batch_size, seq_len = batch or PRESETS[preset].batch, seq or PRESETS[preset].seq
    model, spec, device, dtype = random_llama(preset, device, layers, seed)
    amp_dtype = autocast_dtype(precision, device)
    n_prompts = 4 * batch_size if eval_prompts is None else eval_prompts
    ids, prompts = _random_inputs(spec["vocab_size"], batch_size, seq_len, n_prompts, seed)
    ids = ids.to(device)
    labels = response_labels(ids, response)

    runs, times, eval_s = _take_turns(
        model,
        ids,
        labels,
        prompts,
        variants,
        rounds=rounds,
        seed=seed,
        r=r,
        steps=steps,
        warmup=warmup,
        amp_dtype=amp_dtype,
    )
    results = [_step_result(rs, times[v], ids.numel()) for v, rs in runs.items()]
    kinds = {"label-before": (old_autocast_dtype(device), "all"), "label-now": (amp_dtype, "last")}
    evals = []
    for name, secs in eval_s.items():
        median = statistics.median(secs)
        dtype_, logits = kinds[name]
        evals.append(EvalResult(name, precision_name(dtype_), logits, median, min(secs), n_prompts / median))
    meta = {
        "preset": preset,
        **_machine(device, dtype, precision, amp_dtype),
        "batch": batch_size, "seq": seq_len, "response": response, "steps": steps, "warmup": warmup,
        "rounds": rounds, "r": r, "layers": spec["num_hidden_layers"], "eval_prompts": n_prompts,
        "eval_prompt_tokens": sum(len(p) for p in prompts), "torch": torch.__version__,
    }  # fmt: skip
    return meta, results, evals, ratios(results, evals)


def _random_inputs(vocab: int, batch_size: int, seq_len: int, n_prompts: int, seed: int):
    """The training batch ``(B, T)`` and the label-evaluation prompts (lengths between half and all
    of ``seq_len``), random tokens from one generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)  # (B, T)
    lengths = torch.randint(max(1, seq_len // 2), seq_len + 1, (n_prompts,), generator=g).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    return ids, prompts


def _take_turns(model, ids, labels, prompts, variants, *, rounds, seed, r, steps, warmup, amp_dtype):
    """Variants take turns, round after round, so that drifts of the machine (other processes,
    clocks, caches) fall on every variant alike. Returns each variant's results (one per round),
    each variant's step times (all rounds), and each label-evaluation run's seconds (one per round)."""
    runs: dict[str, list[Result]] = {v: [] for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    eval_s: dict[str, list[float]] = {"label-before": [], "label-now": []} if prompts else {}
    for round_ in range(rounds):
        for v in variants:
            torch.manual_seed(seed)
            with reference_kernels() if VARIANTS[v].full_logits else nullcontext():
                res, step_times = bench_variant(
                    VARIANTS[v], model, ids, labels, r=r, steps=steps, warmup=warmup, amp_dtype=amp_dtype
                )
            runs[v].append(res)
            times[v] += step_times
            print(
                f"  round {round_ + 1}/{rounds} {v:16s} {res.step_s:.4f} s/step", file=sys.stderr, flush=True
            )
        if prompts:
            torch.manual_seed(seed)
            for name, sec in bench_label_eval(
                model, prompts, batch_size=ids.shape[0], r=r, amp_dtype=amp_dtype
            ).items():
                eval_s[name].append(sec)
                print(f"  round {round_ + 1}/{rounds} {name:16s} {sec:.4f} s", file=sys.stderr, flush=True)
    return runs, times, eval_s


def _step_result(rounds: list[Result], times: list[float], n_tokens: int) -> Result:
    """One variant's rounds as one row: the median over rounds, the fastest of all steps, the highest peak."""
    median = statistics.median(r.step_s for r in rounds)
    peak = None if rounds[0].peak_mib is None else max(r.peak_mib for r in rounds)
    return replace(
        rounds[0], step_s=median, step_s_min=min(times), tokens_per_s=n_tokens / median, peak_mib=peak
    )


def _machine(device: torch.device, dtype, precision: str, amp_dtype) -> dict:
    """The run's device and number formats, as the JSON's ``meta`` has them."""
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "cpu_native_bf16": device.type == "cpu" and autocast_dtype("auto", device) is not None,
        "dtype": str(dtype),
        "precision": precision,
        "autocast": precision_name(amp_dtype),
    }
