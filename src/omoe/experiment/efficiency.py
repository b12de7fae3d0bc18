"""The paper's Table 3: generation latency and extra memory of each method over the base model.

``omoe bench --table3``. One run builds one random LLaMA of a preset's shape (LLaMA-2 7B in bf16 on
CUDA, the bundled SmolLM2-135M's shape in fp32 on CPU: random weights, so the timings are those of
the architecture, not of any trained model), or loads a real model's weights (``--model``), and
measures, for the base model and each method in turn (adapters injected, measured, unloaded):

- latency: wall time of ``generate`` for a batch of prompts, greedy, exactly ``new_tokens`` new
  tokens each (EOS cannot stop it early), median over rounds, variants taking turns;
- adapter MiB: bytes of the adapter's parameters;
- peak MiB: on CUDA ``torch.cuda.max_memory_allocated`` during generation; on CPU, which has no
  such counter, the bytes of the parameters and buffers plus the peak of the tensors generation
  holds at once (``omoe.models.memory.cpu_peak_bytes``: the profiler's per-op allocations, a separate
  untimed run); and its excess over the base model's;
- train activations MiB: bytes of the tensors autograd saves in one training forward on the same
  batch (``omoe bench``'s ``saved_tensors_hooks`` count), device independent.
"""

from __future__ import annotations

import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from omoe import OMoEConfig, get_omoe_model
from omoe.experiment.report import BENCH_KIND, Results, table3
from omoe.experiment.runner import hardware
from omoe.models import load_model
from omoe.models.memory import cpu_peak_bytes, saved_tensor_bytes
from omoe.models.testing import bench_device, random_llama
from omoe.utils import atomic_write_text, json_text

# name -> adapter config (None = the frozen base model), with the rank filled in by build_config.
METHODS = {
    "base": None,
    "lora": dict(method="lora"),
    "dora": dict(method="dora"),
    "moe-soft": dict(method="moe", num_experts=2),
    "moe-top2of8": dict(method="moe", num_experts=8, top_k=2),
    "omoe-soft": dict(method="omoe", num_experts=2),
    "omoe-top2of8": dict(method="omoe", num_experts=8, top_k=2),
}
DEFAULT_METHODS = ("base", "lora", "dora", "moe-top2of8", "omoe-soft", "omoe-top2of8")


def build_config(method: str, r: int) -> OMoEConfig | None:
    spec = METHODS[method]
    return None if spec is None else OMoEConfig(**spec, r=r, alpha=2 * r)


def _pretrained(name: str, device=None):
    """A loadable model's real weights, frozen: bf16 on CUDA, fp32 on CPU, as ``random_llama``."""
    device, dtype = bench_device(device)
    model, _ = load_model(name, dtype=dtype, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, device, dtype


def measure(model, method: str, ids, *, r, new_tokens, autocast_dtype) -> dict:
    """One variant once: inject, time one generate, count memory, unload."""
    device = ids.device
    config = build_config(method, r)
    wrapped = model if config is None else get_omoe_model(model, config)
    wrapped.eval()
    adapter = [p for p in wrapped.parameters() if p.requires_grad]
    autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else nullcontext
    mask = torch.ones_like(ids)

    def generate():
        with torch.inference_mode(), autocast():
            return wrapped.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                max_new_tokens=new_tokens, pad_token_id=0,
            )  # fmt: skip

    generate()  # warm-up: kernels, caches, allocator
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    out = generate()
    sync()
    latency = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        tensors = [*wrapped.parameters(), *wrapped.buffers()]
        weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
        peak = (weights + cpu_peak_bytes(generate)) / 2**20

    def forward():
        with autocast():
            if adapter:
                return wrapped(input_ids=ids, labels=ids).loss
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            return wrapped(inputs_embeds=embeds, labels=ids).loss

    wrapped.train()
    saved = saved_tensor_bytes(forward) / 2**20
    result = {
        "method": method,
        "trainable": sum(p.numel() for p in adapter),
        "adapter_mib": sum(p.numel() * p.element_size() for p in adapter) / 2**20,
        "latency_s": latency,
        "peak_mib": peak,
        "train_saved_mib": saved,
    }
    if config is not None:
        wrapped.unload()
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run(preset: str, methods=DEFAULT_METHODS, *, batch=8, new_tokens=32, prompt_tokens=64, rounds=3,
        r=16, device=None, layers=None, seed=0, model_name=None) -> dict:  # fmt: skip
    """Measure ``methods`` on a random model of ``preset``'s shape, or on the real weights of
    ``model_name``; the JSON ``omoe report --table 3`` reads."""
    if model_name is None:
        model, spec, device, dtype = random_llama(preset, device, layers, seed)
        weights = "random weights"
    else:
        model, device, dtype = _pretrained(model_name, device)
        spec = {"vocab_size": model.config.vocab_size, "num_hidden_layers": model.config.num_hidden_layers}
        preset, weights = model_name, "pretrained weights"
    model.generation_config.eos_token_id = None  # no early stop: exactly new_tokens for every method
    ids = torch.randint(3, spec["vocab_size"], (batch, prompt_tokens), device=device)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    if "base" not in methods:
        methods = ("base", *methods)  # the ratios need it
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for round_ in range(rounds):
        for m in methods:
            torch.manual_seed(seed)
            res = measure(model, m, ids, r=r, new_tokens=new_tokens, autocast_dtype=autocast_dtype)
            runs[m].append(res)
            print(
                f"  round {round_ + 1}/{rounds} {m:13s} {res['latency_s']:.3f} s", file=sys.stderr, flush=True
            )
    rows = []
    for rs in runs.values():
        row = dict(rs[0])
        row["latency_s"] = statistics.median(x["latency_s"] for x in rs)
        row["peak_mib"] = max(x["peak_mib"] for x in rs)
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["latency_ratio"] = row["latency_s"] / base["latency_s"]
        row["tokens_per_s"] = batch * new_tokens / row["latency_s"]
        row["extra_peak_mib"] = row["peak_mib"] - base["peak_mib"]
        row["peak_ratio"] = row["peak_mib"] / base["peak_mib"]
    hw = hardware(str(device))
    meta = {
        "preset": preset,
        "layers": spec["num_hidden_layers"],
        "weights": weights,
        "device": hw["device_name"]
        if device.type == "cuda"
        else f"{hw['device_name']} ({torch.get_num_threads()} threads)",
        "dtype": str(dtype).removeprefix("torch."),
        "autocast": str(autocast_dtype).removeprefix("torch.") if autocast_dtype else None,
        "batch": batch,
        "new_tokens": new_tokens,
        "prompt_tokens": prompt_tokens,
        "rounds": rounds,
        "r": r,
        "peak_measured": True,
        "peak_method": "cuda" if device.type == "cuda" else "profiler",
        "torch": torch.__version__,
        "hardware": hw,
    }
    return {"kind": BENCH_KIND, "meta": meta, "results": rows}


def table3_main(args, preset: str, methods: list[str]) -> int:
    """``omoe bench --table3``: measure, print the table, write the JSON (``--output``)."""
    data = run(
        preset, tuple(methods), batch=args.batch or 8, new_tokens=args.new_tokens,
        prompt_tokens=args.prompt_tokens, rounds=args.rounds, r=args.r, device=args.device, layers=args.layers,
        model_name=getattr(args, "model", None),
    )  # fmt: skip
    print(table3(Results([], [data], Path("."))).markdown)
    if args.output:
        atomic_write_text(args.output, json_text(data, indent=2) + "\n")
        print(f"\nwrote {args.output}; omoe report --results {args.output} --table 3")
    return 0
