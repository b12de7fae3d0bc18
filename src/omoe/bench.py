"""Training-step and evaluation benchmark: frozen base, our LoRA, PEFT's LoRA and our default OMoE.

``python -m omoe.bench`` or ``omoe bench``. Every variant runs on the same base weights (adapters
are injected, measured, then unloaded), with the same batch and optimizer (AdamW) and the trainer's
own loss (:func:`omoe.train.trainer.token_loss_sum`: logits only at the supervised positions, the
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

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from omoe import OMoEConfig, get_omoe_model, options
from omoe.data.tokenize import IGNORE_INDEX
from omoe.errors import ConfigError
from omoe.eval.batching import length_sorted_batches, pad
from omoe.eval.label import next_token_scores
from omoe.experiment.efficiency import DEFAULT_METHODS, METHODS, table3_main
from omoe.layers.kernels import reference_kernels
from omoe.layers.reference import use_before_representation
from omoe.models.logits import logits_only_at
from omoe.models.memory import saved_tensor_bytes
from omoe.models.precision import PRECISIONS, autocast, autocast_dtype, precision_name
from omoe.models.shapes import PRESETS
from omoe.models.testing import random_llama
from omoe.options import check_int
from omoe.train.trainer import token_loss_sum
from omoe.utils import atomic_write_text, json_text

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Variant:
    """A row of the training benchmark: which adapter, and whether it runs the step of before."""

    name: str
    adapter: str  # base | lora | peft-lora | omoe
    # All (B, T, vocab) logits, the old precision and the reference kernels (aten::bernoulli_
    # dropout, unfused hidden; layers/kernels.py): the step as it was when issue 10 was filed.
    full_logits: bool = False
    before_representation: bool = False  # E_s = down(h_s) - down(h0), as before issue 9


VARIANTS = {
    v.name: v
    for v in (
        Variant("base", "base"),
        Variant("lora", "lora"),
        Variant("peft-lora", "peft-lora"),
        Variant("omoe", "omoe"),
        Variant("omoe-full-logits", "omoe", full_logits=True),
        Variant("omoe-repr-before", "omoe", before_representation=True),
    )
}
BASELINE = "omoe-full-logits"
# (what the ratio says, numerator row, denominator row, target): issue 10's targets, from one run
RATIOS = (
    ("speed-up of the default OMoE step", BASELINE, "omoe", ">= 2.5"),
    ("OMoE step / PEFT LoRA step", "omoe", "peft-lora", "<= 1.3"),
    ("speed-up of the label evaluation", "label-before", "label-now", ">= 2"),
    # issue 9: the exact representation may cost at most 5% over the difference of full products
    ("exact representation's step / before's", "omoe", "omoe-repr-before", "<= 1.05"),
)


@dataclass
class Result:
    variant: str
    precision: str
    logits: str  # "all" or "used"
    trainable: int
    step_s: float  # median over rounds of the median over timed steps
    step_s_min: float  # fastest timed step
    tokens_per_s: float
    saved_mib: float
    peak_mib: float | None


@dataclass
class EvalResult:
    variant: str  # label-before | label-now
    precision: str
    logits: str
    seconds: float  # median over rounds
    seconds_min: float
    prompts_per_s: float


def old_autocast_dtype(device: torch.device) -> torch.dtype | None:
    """What ``precision: auto`` meant before issue 10: autocast on CUDA only."""
    return autocast_dtype("auto", device) if device.type == "cuda" else None


def _wrap(adapter: str, model: nn.Module, r: int) -> tuple[nn.Module, Callable[[], nn.Module]]:
    """Inject ``adapter`` into ``model``; return the wrapped model and a function that unloads it."""
    if adapter == "base":
        return model, lambda: model
    if adapter == "peft-lora":
        import peft

        wrapped = peft.get_peft_model(
            model, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=ALL_TARGETS)
        )
        return wrapped, wrapped.unload
    config = (
        OMoEConfig(method="lora", r=r, alpha=2 * r) if adapter == "lora" else OMoEConfig(r=r, alpha=2 * r)
    )
    wrapped = get_omoe_model(model, config)
    return wrapped, wrapped.unload


def response_labels(ids: torch.Tensor, response: int) -> torch.Tensor:
    """Labels of a fine-tuning batch whose last ``response`` tokens per row are the response
    (``(B, T)``, -100 on the prompt), as the trainer's data has them."""
    labels = ids.clone()
    labels[:, : max(0, ids.shape[1] - response)] = IGNORE_INDEX
    return labels


def full_logits_loss_sum(model, labels: torch.Tensor, **inputs) -> torch.Tensor:
    """The trainer's loss as it was: every position's logits, then the masked cross-entropy."""
    logits = model(**inputs).logits  # (B, T, V)
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def bench_variant(
    variant: Variant, model, ids, labels, *, r, steps, warmup, amp_dtype
) -> tuple[Result, list]:
    """Time ``steps`` training steps of ``variant`` after ``warmup`` untimed ones; the step times too."""
    device = ids.device
    wrapped, unload = _wrap(variant.adapter, model, r)
    if variant.before_representation:
        use_before_representation(wrapped)
    wrapped.train()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    embeddings = model.get_input_embeddings()
    amp_dtype = old_autocast_dtype(device) if variant.full_logits else amp_dtype
    mask = torch.ones_like(ids)
    n_tokens = max(1, int((labels[:, 1:] != IGNORE_INDEX).sum()))

    def forward() -> torch.Tensor:
        with autocast(amp_dtype, device):
            if variant.full_logits:
                return full_logits_loss_sum(wrapped, labels, input_ids=ids, attention_mask=mask) / n_tokens
            if params:
                return token_loss_sum(wrapped, ids, mask, labels) / n_tokens
            # Frozen base: backward through the whole network from the embeddings, the floor that
            # every adapter method pays.
            embeds = embeddings(ids).detach().requires_grad_(True)
            targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T)
            keep = targets != IGNORE_INDEX
            with logits_only_at(wrapped, keep):
                logits = wrapped(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits  # (M, V)
            return F.cross_entropy(logits.float(), targets[keep], reduction="sum") / n_tokens

    def step() -> None:
        forward().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    saved = saved_tensor_bytes(forward) / 2**20
    if opt is not None:
        opt.zero_grad(set_to_none=True)
        opt.state.clear()
    unload()
    for p in model.parameters():
        p.requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    median = statistics.median(times)
    result = Result(
        variant.name, precision_name(amp_dtype), "all" if variant.full_logits else "used", trainable,
        median, min(times), ids.numel() / median, saved, peak,
    )  # fmt: skip
    return result, times


def bench_label_eval(model, prompts, *, batch_size, r, amp_dtype) -> dict[str, float]:
    """Seconds to score ``prompts`` with the label protocol on the default OMoE: as it was (full
    logits, the old precision) and as it is (last-position logits, ``amp_dtype``)."""
    device = next(model.parameters()).device
    wrapped, unload = _wrap("omoe", model, r)
    wrapped.eval()
    label_ids = [5, 6, 7, 8]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def before() -> None:  # the protocol's loop as it was (run with the reference kernels)
        for batch in length_sorted_batches([len(p) for p in prompts], batch_size):
            input_ids, attention_mask = pad([prompts[i] for i in batch], 0, side="right")
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            logits = wrapped(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
            last = attention_mask.sum(1) - 1
            logits[torch.arange(len(batch), device=device), last][:, label_ids].float().cpu()

    def now() -> None:
        next_token_scores(wrapped, prompts, label_ids, 0, batch_size)

    runs = {
        "label-before": (before, old_autocast_dtype(device), reference_kernels),
        "label-now": (now, amp_dtype, nullcontext),
    }
    seconds = {}
    try:
        with torch.inference_mode():
            for name, (fn, dtype, kernels) in runs.items():
                with kernels(), autocast(dtype, device):
                    fn()  # warm-up
                    sync()
                    t0 = time.perf_counter()
                    fn()
                    sync()
                seconds[name] = time.perf_counter() - t0
    finally:
        unload()
    return seconds


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
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, spec["vocab_size"], (batch_size, seq_len), generator=g).to(device)  # (B, T)
    labels = response_labels(ids, response)
    # Label-evaluation prompts: lengths between half and all of --seq, random tokens.
    n_prompts = 4 * batch_size if eval_prompts is None else eval_prompts
    lengths = torch.randint(max(1, seq_len // 2), seq_len + 1, (n_prompts,), generator=g).tolist()
    prompts = [torch.randint(3, spec["vocab_size"], (n,), generator=g).tolist() for n in lengths]

    # Variants take turns, round after round, so that drifts of the machine (other processes,
    # clocks, caches) fall on every variant alike; a variant's time is its median over rounds.
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
                model, prompts, batch_size=batch_size, r=r, amp_dtype=amp_dtype
            ).items():
                eval_s[name].append(sec)
                print(f"  round {round_ + 1}/{rounds} {name:16s} {sec:.4f} s", file=sys.stderr, flush=True)

    results = []
    for v, rs in runs.items():
        median = statistics.median(r.step_s for r in rs)
        peak = None if rs[0].peak_mib is None else max(r.peak_mib for r in rs)
        results.append(
            replace(
                rs[0],
                step_s=median,
                step_s_min=min(times[v]),
                tokens_per_s=ids.numel() / median,
                peak_mib=peak,
            )
        )
    kinds = {"label-before": (old_autocast_dtype(device), "all"), "label-now": (amp_dtype, "last")}
    evals = []
    for name, secs in eval_s.items():
        median = statistics.median(secs)
        evals.append(
            EvalResult(
                name, precision_name(kinds[name][0]), kinds[name][1], median, min(secs), n_prompts / median
            )
        )
    meta = {
        "preset": preset,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "cpu_native_bf16": device.type == "cpu" and autocast_dtype("auto", device) is not None,
        "dtype": str(dtype),
        "precision": precision,
        "autocast": precision_name(amp_dtype),
        "batch": batch_size,
        "seq": seq_len,
        "response": response,
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "r": r,
        "layers": spec["num_hidden_layers"],
        "eval_prompts": n_prompts,
        "eval_prompt_tokens": sum(lengths),
        "torch": torch.__version__,
    }
    return meta, results, evals, ratios(results, evals)


def ratios(results: list[Result], evals: list[EvalResult]) -> list[dict]:
    """Issues 10's and 9's targets as ratios of times measured in this run (None where a row is missing)."""
    seconds = {r.variant: r.step_s for r in results} | {e.variant: e.seconds for e in evals}
    out = []
    for what, num, den, target in RATIOS:
        value = seconds[num] / seconds[den] if num in seconds and den in seconds else None
        op, bound = target.split()
        met = None if value is None else (value >= float(bound) if op == ">=" else value <= float(bound))
        out.append({"ratio": what, "of": f"{num} / {den}", "value": value, "target": target, "met": met})
    return out


def format_table(meta: dict, results: list[Result], evals: list[EvalResult], ratio_rows: list[dict]) -> str:
    by = {r.variant: r for r in results}
    ref = by.get("peft-lora")
    lines = [
        f"Training step (forward+backward+AdamW), {meta['preset']} ({meta['layers']} blocks), batch "
        f"{meta['batch']}x{meta['seq']} ({meta['response']} supervised tokens per row), {meta['device']}, "
        f"{meta['dtype']} weights, precision {meta['precision']} = {meta['autocast']}; median of "
        f"{meta['rounds']} rounds x {meta['steps']} steps (fastest step in brackets)",
        "",
        "| variant | precision | logits | trainable | s/step | tokens/s | x PEFT LoRA | saved MiB | x PEFT LoRA "
        "| peak MiB | x PEFT LoRA |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ratio(a, b):
        return f"{a / b:.2f}" if (a is not None and b) else "-"

    for r in results:
        lines.append(
            f"| {r.variant} | {r.precision} | {r.logits} | {r.trainable:,d} | {r.step_s:.4f} ({r.step_s_min:.4f}) "
            f"| {r.tokens_per_s:,.0f} | {ratio(r.step_s, ref and ref.step_s)} | "
            f"{r.saved_mib:.1f} | {ratio(r.saved_mib, ref and ref.saved_mib)} | "
            f"{'-' if r.peak_mib is None else f'{r.peak_mib:.0f}'} | {ratio(r.peak_mib, ref and ref.peak_mib)} |"
        )
    if evals:
        lines += [
            "",
            f"Label-protocol evaluation of the default OMoE: {meta['eval_prompts']} prompts "
            f"({meta['eval_prompt_tokens']:,d} tokens) in batches of {meta['batch']}; median of "
            f"{meta['rounds']} rounds (fastest in brackets)",
            "",
            "| run | precision | logits | seconds | prompts/s |",
            "|---|---|---|---:|---:|",
        ]
        for e in evals:
            lines.append(
                f"| {e.variant} | {e.precision} | {e.logits} | {e.seconds:.4f} ({e.seconds_min:.4f}) "
                f"| {e.prompts_per_s:.1f} |"
            )
    lines += [
        "",
        "Issue 10's targets and issue 9's (stated for `--preset smollm2-135m --rounds 3` on a 2-core CPU):",
        "",
        "| ratio | of | value | target | met |",
        "|---|---|---:|---|---|",
    ]
    for row in ratio_rows:
        value = "-" if row["value"] is None else f"{row['value']:.2f}"
        met = "-" if row["met"] is None else ("yes" if row["met"] else "no")
        lines.append(f"| {row['ratio']} | {row['of']} | {value} | {row['target']} | {met} |")
    return "\n".join(lines)


@dataclass
class BenchConfig:
    """What ``omoe bench`` measures (``--config FILE.yaml`` and ``--key value``, as every command)."""

    preset: str | None = field(
        default=None, metadata={"help": f"model shape, one of {', '.join(PRESETS)} (default: llama2-7b on CUDA, "
                                "cpu-small otherwise; --table3: smollm2-135m on CPU)"},
    )  # fmt: skip
    variants: str | None = field(
        default=None, metadata={"help": f"comma list from {', '.join(VARIANTS)} (with --table3: from "
                                f"{', '.join(METHODS)})"},
    )  # fmt: skip
    steps: int = field(default=5, metadata={"help": "timed steps per variant"})
    warmup: int = field(default=2, metadata={"help": "untimed steps per variant"})
    batch: int | None = field(default=None, metadata={"help": "sequences per step (preset default)"})
    seq: int | None = field(default=None, metadata={"help": "tokens per sequence (preset default)"})
    r: int = field(default=16, metadata={"help": "LoRA rank of every variant"})
    layers: int | None = field(default=None, metadata={"help": "override the preset's number of blocks"})
    rounds: int = field(default=3, metadata={"help": "variants take turns this many times; medians"})
    threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads (default: torch's); 1 is steadier when other processes share the cores"
        },
    )
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)"})
    precision: str | None = field(
        default=None, metadata={"help": f"autocast of every variant but omoe-full-logits, one of {', '.join(PRECISIONS)} "
                                "(default auto: bf16 on CUDA and on CPUs with native bf16, else fp32)"},
    )  # fmt: skip
    response: int = field(
        default=8,
        metadata={
            "help": "supervised (response) tokens at the end of each row; the loss reads logits only there"
        },
    )
    eval_prompts: int | None = field(
        default=None,
        metadata={"help": "prompts of the label-evaluation timing (default 4 x batch; 0 = skip it)"},
    )
    output: str | None = field(default=None, metadata={"help": "also write the results as JSON to this file"})
    table3: bool = field(
        default=False,
        metadata={"help": "measure the paper's Table 3 instead: generation latency and extra memory of LoRA, "
                  "DoRA, MoE and OMoE over the base model, one run (random weights)"},
    )  # fmt: skip
    new_tokens: int = field(default=32, metadata={"help": "--table3: tokens generated per prompt"})
    prompt_tokens: int = field(default=64, metadata={"help": "--table3: tokens per prompt (random ids)"})
    model: str | None = field(
        default=None,
        metadata={"help": "--table3: measure this model's real weights (a built-in name such as "
                  "smollm2-135m-instruct, a .gguf file or a local HF directory) instead of random weights"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"unknown --preset {self.preset!r}; allowed: {', '.join(PRESETS)}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ConfigError(f"unknown --precision {self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        allowed, default = (
            (tuple(METHODS), DEFAULT_METHODS) if self.table3 else (tuple(VARIANTS), tuple(VARIANTS))
        )
        chosen = [v.strip() for v in (self.variants or ",".join(default)).split(",") if v.strip()]
        bad = [v for v in chosen if v not in allowed]
        if bad or not chosen:
            raise ConfigError(
                f"unknown variant(s) {', '.join(bad) or '(none)'}; allowed: {', '.join(allowed)}"
            )
        self.variants = ",".join(chosen)
        for name in ("steps", "warmup", "batch", "seq", "r", "layers", "rounds", "threads", "new_tokens",
                     "prompt_tokens", "response", "eval_prompts"):  # fmt: skip
            low = 0 if name in ("warmup", "eval_prompts") else 1
            nullable = name in ("batch", "seq", "layers", "threads", "eval_prompts")  # None: a default
            check_int(f"--{name.replace('_', '-')}", getattr(self, name), low, nullable=nullable)
        if self.model and not self.table3:
            raise ConfigError("--model applies to --table3 only; the training benchmark uses --preset shapes")
        if self.table3 and self.precision is not None:
            raise ConfigError(
                "--precision applies to the training benchmark; --table3 autocasts to bf16 on CUDA only"
            )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_config_arguments(parser, BenchConfig)


def main_from_args(args: argparse.Namespace) -> int:
    return measure(options.build(BenchConfig, options.config_data(args, BenchConfig)))


def measure(args: BenchConfig) -> int:
    """Run the benchmark ``args`` describes, print its table, write ``args.output``."""
    variants = args.variants.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but CUDA is not available; allowed here: cpu")
    on_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if args.precision == "fp16" and not on_cuda:
        raise ConfigError("--precision fp16 needs CUDA; allowed on CPU: auto, fp32, bf16")
    if args.table3:
        return table3_main(args, args.preset or ("llama2-7b" if on_cuda else "smollm2-135m"), variants)
    preset = args.preset or ("llama2-7b" if on_cuda else "cpu-small")
    meta, results, evals, ratio_rows = run(
        preset,
        variants,
        args.steps,
        args.warmup,
        args.r,
        args.device,
        args.batch,
        args.seq,
        layers=args.layers,
        rounds=args.rounds,
        precision=args.precision or "auto",
        response=args.response,
        eval_prompts=args.eval_prompts,
    )
    print(format_table(meta, results, evals, ratio_rows))
    if args.output:
        report = {
            "kind": "omoe.bench.train",
            "meta": meta,
            "results": [asdict(r) for r in results],
            "eval": [asdict(e) for e in evals],
            "ratios": ratio_rows,
        }
        atomic_write_text(args.output, json_text(report, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omoe.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
