"""Training-step benchmark: frozen base, our LoRA, PEFT's LoRA and our default OMoE, one run.

``python -m omoe.bench`` or ``omoe bench``. Every variant runs on the same base weights (adapters
are injected, measured, then unloaded), with the same batch, autocast and optimizer (AdamW), so
the printed ratios compare like with like. A timing is a median over timed steps after warm-up.

Memory is reported two ways:
- ``saved MiB``: bytes of the tensors autograd keeps for backward during one forward (counted
  with ``saved_tensors_hooks``, unique storages), a device-independent activation measure;
- ``peak MiB`` (CUDA only): ``torch.cuda.max_memory_allocated`` over the timed steps, weights
  included; the issue's targets are stated against it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from omoe import OMoEConfig, get_omoe_model

PRESETS = {
    # A LLaMA small enough for 2 CPU cores; the same family and layout as LLaMA-2.
    "cpu-small": dict(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=32000, batch=4, seq=256,
    ),
    # For tests of the benchmark itself: seconds, numbers meaningless.
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, batch=2, seq=32,
    ),
    # The bundled SmolLM2-135M-Instruct's shape (random weights; the quickstart's model).
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, batch=8, seq=128,
    ),
    # The paper's LLaMA-2 7B shape, random bf16 weights (GPU).
    "llama2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, batch=4, seq=512,
    ),
}  # fmt: skip
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("base", "lora", "peft-lora", "omoe")


@dataclass
class Result:
    variant: str
    trainable: int
    step_s: float
    saved_mib: float
    peak_mib: float | None


def _wrap(variant: str, model: nn.Module, r: int) -> tuple[nn.Module, Callable[[], nn.Module]]:
    """Inject ``variant`` into ``model``; return the wrapped model and a function that unloads it."""
    if variant == "base":
        return model, lambda: model
    if variant == "peft-lora":
        import peft

        wrapped = peft.get_peft_model(
            model, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=ALL_TARGETS)
        )
        return wrapped, wrapped.unload
    config = (
        OMoEConfig(method="lora", r=r, alpha=2 * r) if variant == "lora" else OMoEConfig(r=r, alpha=2 * r)
    )
    wrapped = get_omoe_model(model, config)
    return wrapped, wrapped.unload


def _saved_bytes(step: Callable[[], torch.Tensor]) -> int:
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), t.device)] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(seen.values())


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors alive at once while ``fn`` runs, over those it allocates (CPU). CPU has
    no ``max_memory_allocated``; the profiler records each op's own allocations and frees
    (``self_cpu_memory_usage``), and their running sum in time order peaks where ``fn`` holds the
    most. Op granularity: a peak inside one op that it frees before returning is not seen."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def bench_variant(variant, model, batch, *, r, steps, warmup, autocast_dtype) -> Result:
    device = batch.device
    wrapped, unload = _wrap(variant, model, r)
    wrapped.train()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    embeddings = model.get_input_embeddings()

    def forward() -> torch.Tensor:
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with ctx:
            if params:
                return wrapped(input_ids=batch, labels=batch).loss
            # Frozen base: backward through the whole network from the embeddings, the floor that
            # every adapter method pays.
            embeds = embeddings(batch).detach().requires_grad_(True)
            return wrapped(inputs_embeds=embeds, labels=batch).loss

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
    saved = _saved_bytes(forward) / 2**20
    if opt is not None:
        opt.zero_grad(set_to_none=True)
        opt.state.clear()
    unload()
    for p in model.parameters():
        p.requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Result(variant, trainable, statistics.median(times), saved, peak)


def bench_device(device=None) -> tuple[torch.device, torch.dtype]:
    """The device (default: CUDA when available) and weight dtype (bf16 on CUDA, fp32 on CPU)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        # Denormal floats (e.g. from SiLU's tails) make CPU arithmetic several times slower; the
        # flag applies to every variant alike. The train/eval commands set it too.
        torch.set_flush_denormal(True)
    return device, (torch.bfloat16 if device.type == "cuda" else torch.float32)


def random_llama(preset: str, device=None, layers: int | None = None, seed: int = 0):
    """A frozen random ``LlamaForCausalLM`` of ``preset``'s shape: bf16 on CUDA, fp32 on CPU.

    Returns ``(model, LlamaConfig fields, device, dtype)``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = {k: v for k, v in PRESETS[preset].items() if k not in ("batch", "seq")}
    if layers:
        spec["num_hidden_layers"] = layers
    device, dtype = bench_device(device)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**spec, dtype=dtype)).to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, spec, device, dtype


def run(
    preset="cpu-small",
    variants=VARIANTS,
    steps=5,
    warmup=2,
    r=16,
    device=None,
    batch=None,
    seq=None,
    seed=0,
    layers=None,
    rounds=1,
):
    batch_size, seq_len = batch or PRESETS[preset]["batch"], seq or PRESETS[preset]["seq"]
    model, spec, device, dtype = random_llama(preset, device, layers, seed)
    ids = torch.randint(0, spec["vocab_size"], (batch_size, seq_len), device=device)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    # Variants take turns, round after round, so that drifts of the machine (other processes,
    # clocks, caches) fall on every variant alike; a variant's time is its median over rounds.
    runs: dict[str, list[Result]] = {v: [] for v in variants}
    for round_ in range(rounds):
        for v in variants:
            torch.manual_seed(seed)
            res = bench_variant(v, model, ids, r=r, steps=steps, warmup=warmup, autocast_dtype=autocast_dtype)
            runs[v].append(res)
            print(
                f"  round {round_ + 1}/{rounds} {v:10s} {res.step_s:.4f} s/step", file=sys.stderr, flush=True
            )
    results = [
        Result(
            v,
            rs[0].trainable,
            statistics.median(r.step_s for r in rs),
            rs[0].saved_mib,
            None if rs[0].peak_mib is None else max(r.peak_mib for r in rs),
        )
        for v, rs in runs.items()
    ]
    meta = {
        "preset": preset,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(dtype),
        "autocast": str(autocast_dtype),
        "batch": batch_size,
        "seq": seq_len,
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "r": r,
        "layers": spec["num_hidden_layers"],
        "torch": torch.__version__,
    }
    return meta, results


def format_table(meta: dict, results: list[Result]) -> str:
    by = {r.variant: r for r in results}
    ref = by.get("peft-lora")
    lines = [
        f"Training step (forward+backward+AdamW), {meta['preset']} ({meta['layers']} blocks), batch {meta['batch']}x{meta['seq']}, "
        f"{meta['device']}, {meta['dtype']} weights, autocast {meta['autocast']}, median of {meta['rounds']} rounds x {meta['steps']} steps",
        "",
        "| variant | trainable | s/step | x PEFT LoRA | saved MiB | x PEFT LoRA | peak MiB | x PEFT LoRA |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ratio(a, b):
        return f"{a / b:.2f}" if (a is not None and b) else "-"

    for r in results:
        lines.append(
            f"| {r.variant} | {r.trainable:,d} | {r.step_s:.4f} | {ratio(r.step_s, ref and ref.step_s)} | "
            f"{r.saved_mib:.1f} | {ratio(r.saved_mib, ref and ref.saved_mib)} | "
            f"{'-' if r.peak_mib is None else f'{r.peak_mib:.0f}'} | {ratio(r.peak_mib, ref and ref.peak_mib)} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="model shape (default: llama2-7b on CUDA, cpu-small otherwise)",
    )
    parser.add_argument(
        "--variants",
        default=None,
        help=f"comma list from {', '.join(VARIANTS)} (with --table3: from {', '.join(_table3_methods())})",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (preset default)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (preset default)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank of every variant")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's number of blocks")
    parser.add_argument("--rounds", type=int, default=3, help="variants take turns this many times; medians")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: torch's); 1 is steadier when other processes share the cores",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--output", default=None, help="also write the results as JSON to this file")  # fmt: skip
    table3 = parser.add_argument_group(
        "Table 3 (--table3)",
        "generation latency and extra memory of LoRA, DoRA, MoE and OMoE over the base model, one run "
        "(default preset: llama2-7b on CUDA, smollm2-135m on CPU; random weights)",
    )
    table3.add_argument("--table3", action="store_true", help="measure the paper's Table 3 instead")
    table3.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt")
    table3.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt (random ids)")
    table3.add_argument(
        "--model", default=None,
        help="measure this model's real weights (a built-in name such as smollm2-135m-instruct, a .gguf "
        "file or a local HF directory) instead of random weights of --preset's shape",
    )  # fmt: skip


def _table3_methods() -> tuple[str, ...]:
    from omoe.experiment.efficiency import METHODS

    return tuple(METHODS)


def main_from_args(args: argparse.Namespace) -> int:
    from omoe.errors import ConfigError

    if args.table3:
        from omoe.experiment.efficiency import DEFAULT_METHODS

        allowed, default = _table3_methods(), DEFAULT_METHODS
    else:
        allowed, default = VARIANTS, VARIANTS
    variants = [v.strip() for v in (args.variants or ",".join(default)).split(",") if v.strip()]
    bad = [v for v in variants if v not in allowed]
    if bad or not variants:
        raise ConfigError(f"unknown variant(s) {', '.join(bad) or '(none)'}; allowed: {', '.join(allowed)}")
    for name in ("steps", "warmup", "batch", "seq", "r", "layers", "rounds", "threads", "new_tokens",
                 "prompt_tokens"):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            raise ConfigError(
                f"--{name.replace('_', '-')} must be >= {0 if name == 'warmup' else 1}, got {value}"
            )
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but CUDA is not available; allowed here: cpu")
    on_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if args.model and not args.table3:
        raise ConfigError("--model applies to --table3 only; the training benchmark uses --preset shapes")
    if args.table3:
        from omoe.experiment.efficiency import table3_main

        return table3_main(args, args.preset or ("llama2-7b" if on_cuda else "smollm2-135m"), variants)
    preset = args.preset or ("llama2-7b" if on_cuda else "cpu-small")
    meta, results = run(
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
    )
    print(format_table(meta, results))
    if args.output:
        from omoe.utils import atomic_write_text

        atomic_write_text(
            args.output, json.dumps({"meta": meta, "results": [r.__dict__ for r in results]}, indent=2)
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omoe.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
