"""Measure the orthogonal expert optimizer on SmolLM2-135M-Instruct (CPU-sized, one seed).

Four runs on the configs/fast.yaml data (48 records each of ARC-Easy, BoolQ, OBQA; 18 steps of 8):

    moe + adamw         vanilla MoE-LoRA (2 experts, soft routing), plain AdamW
    moe + orthogonal    the same inside the orthogonal optimizer (configs/orthogonal.yaml)
    omoe + adamw        OMoE (Gram-Schmidt), plain AdamW: separates the two ways of diversifying
    omoe + orthogonal   OMoE inside the orthogonal optimizer

For each: the mean pairwise cosine similarity of the experts' raw representations E_i(x) (before
Gram-Schmidt) on held-out test tokens, accuracy with ``omoe eval --protocol generate --limit 40`` on
ARC-Easy, boolq and openbookqa, and the mean optimizer-step time from metrics.jsonl. Also the
statistics' memory on model shapes built on the meta device. Writes results.json and results.md.

    .venv/bin/python scripts/measure_orthogonal.py [--out docs/bench/orthogonal] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("ARC-Easy", "boolq", "openbookqa")
RUNS = {
    "moe + adamw": {"adapter.method": "moe", "optim.optimizer": "adamw"},
    "moe + orthogonal": {"adapter.method": "moe"},
    "omoe + adamw": {"adapter.method": "omoe", "optim.optimizer": "adamw"},
    "omoe + orthogonal": {"adapter.method": "omoe"},
}


def train_run(name: str, overrides: dict, work: Path, args) -> Path:
    from omoe.train import train
    from omoe.train.config import load_config

    out = work / name.replace(" + ", "-")
    shutil.rmtree(out, ignore_errors=True)
    config = load_config(
        ROOT / "configs" / "orthogonal.yaml",
        {
            "output_dir": str(out),
            "checkpoint_every": 0,
            "logging.progress": False,
            "logging.tensorboard": False,
            "data.limit": args.limit,
            "optim.max_steps": args.max_steps,
            **overrides,
        },
    )
    train(config)
    return out


def step_times(run_dir: Path) -> list[float]:
    """Seconds of each optimizer step (forward, backward, optimizer), as the trainer measured them."""
    from omoe.train.metrics import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    tokens = [0] + [r["tokens"] for r in rows]
    return [(tokens[i + 1] - tokens[i]) / r["tokens_per_s"] for i, r in enumerate(rows)]


def held_out_texts(n_tokens: int, tokenizer, skip: int) -> list[list[int]]:
    """Whole test prompts with answers, records ``skip``... of each task (the eval uses the first 40),
    until each task gives ``n_tokens`` tokens."""
    from omoe.data.loader import load_task
    from omoe.data.prompts import build_prompt

    texts = []
    for task in TASKS:
        got = 0
        for record in load_task(task)[skip:]:
            ids = tokenizer(build_prompt(record, with_output=True))["input_ids"]
            texts.append(ids)
            got += len(ids)
            if got >= n_tokens:
                break
    return texts


@torch.no_grad()
def expert_similarity(run_dir: Path, texts: list[list[int]]) -> dict:
    """Mean over layers, tokens and expert pairs of cos(E_i(x), E_j(x)), raw (before Gram-Schmidt)."""
    from omoe import OMoEModel
    from omoe.models import load_model

    base, _ = load_model("smollm2-135m-instruct")
    model = OMoEModel.from_pretrained(base, run_dir)
    sums: dict[str, float] = {}
    n_tokens = 0
    with model.capture_representations():
        for ids in texts:
            model(input_ids=torch.tensor([ids]))
            for layer, cap in model.expert_representations().items():
                reps = torch.nn.functional.normalize(cap.raw.double(), dim=-1)  # (S, N, d), soft: S = E
                E = reps.shape[0]
                cos = torch.einsum("snd,tnd->stn", reps, reps)  # (E, E, N)
                pairs = cos[torch.triu_indices(E, E, 1).unbind()]  # (pairs, N)
                sums[layer] = sums.get(layer, 0.0) + pairs.mean(0).sum().item()
            n_tokens += len(ids)
    per_layer = {k: v / n_tokens for k, v in sums.items()}
    values = list(per_layer.values())
    return {
        "mean_cos": statistics.fmean(values),
        "min_layer_cos": min(values),
        "max_layer_cos": max(values),
        "tokens": n_tokens,
        "per_layer": per_layer,
    }


def evaluate(run_dir: Path | None, out: Path, args) -> dict:
    """``omoe eval --protocol generate --limit 40`` on the three tasks; returns accuracy per task."""
    from omoe.cli.main import main

    cmd = ["eval", "--model", "smollm2-135m-instruct", "--tasks", ",".join(TASKS), "--protocol", "generate"]
    cmd += ["--limit", str(args.eval_limit), "--output", str(out), "--no-progress"]
    if run_dir is not None:
        cmd += ["--adapter", str(run_dir)]
    if main(cmd) != 0:
        raise SystemExit(f"omoe {' '.join(cmd)} failed")
    results = json.loads(out.read_text())
    return {task: m["accuracy"] for task, m in results["tasks"].items()}


def step_overhead(texts: list[list[int]], rounds: int, batch: int) -> dict:
    """Controlled timing of the optimizer's own cost: two copies of the moe model, one with AdamW, one
    with the orthogonal optimizer (accumulate_steps 1, so its steps alternate accumulating and
    orthogonal), stepping in turns on the same batch; medians per part."""
    from omoe import OMoEConfig, get_omoe_model
    from omoe.models import load_model
    from omoe.optim import OrthogonalExpertOptimizer

    models = []
    for _ in range(2):
        base, tokenizer = load_model("smollm2-135m-instruct")
        torch.manual_seed(0)
        models.append(get_omoe_model(base, OMoEConfig(method="moe")).train())

    def adamw(model):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    optimizers = [
        adamw(models[0]),
        OrthogonalExpertOptimizer(models[1], adamw(models[1]), accumulate_steps=1),
    ]
    seqs = texts[:batch]
    longest = max(len(t) for t in seqs)
    ids = torch.tensor([t + [tokenizer.eos_token_id] * (longest - len(t)) for t in seqs])  # (B, T)
    mask = torch.tensor([[1] * len(t) + [0] * (longest - len(t)) for t in seqs])
    labels = ids.masked_fill(mask == 0, -100)
    times: dict[str, list[float]] = {}

    def one(model, optimizer, record: bool) -> None:
        phase = getattr(optimizer, "phase", "adamw")
        t0 = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        t1 = time.perf_counter()
        optimizer.step()
        t2 = time.perf_counter()
        optimizer.zero_grad()
        if record:
            times.setdefault(f"forward_backward_{phase}", []).append(t1 - t0)
            times.setdefault(f"step_{phase}", []).append(t2 - t1)

    for r in range(rounds + 1):  # round 0 warms up
        for model, optimizer in zip(models, optimizers):
            one(model, optimizer, record=r > 0)
    median = {k: statistics.median(v) for k, v in times.items()}

    def implied(ka: int, ko: int, micro: int) -> float:
        """Step time over AdamW's from the optimizer-step parts only (the hooks' share of the forward
        is below the timing noise of forward + backward)."""
        extra = ka * (median["step_accumulate"] - median["step_adamw"]) + ko * (
            median["step_orthogonal"] - median["step_adamw"]
        )
        return 1 + extra / (ka + ko) / (micro * median["forward_backward_adamw"] + median["step_adamw"])

    return {
        "batch": f"{batch} sequences x {longest} tokens",
        "rounds": rounds,
        "median_s": median,
        "all_s": times,
        "implied_step_ratio": {
            "fast (K_a 5, K_o 1, 2 micro-batches)": implied(5, 1, 2),
            "paper (K_a 10, K_o 1, 8 micro-batches)": implied(10, 1, 8),
        },
    }


def projector_memory() -> list[dict]:
    """MiB of statistics per variant on model shapes built on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM

    from omoe import OMoEConfig, get_omoe_model
    from omoe.models.shapes import SHAPES
    from omoe.optim import OrthogonalExpertOptimizer

    rows = []
    for shape in ("smollm2-135m", "llama2-7b"):
        config = SHAPES[shape].llama_config()
        for label, adapter in (("moe soft k=2", {}), ("moe top-2 of 8", {"num_experts": 8, "top_k": 2})):
            with torch.device("meta"):
                model = get_omoe_model(
                    AutoModelForCausalLM.from_config(config), OMoEConfig(method="moe", **adapter)
                )
            row = {"shape": shape, "adapter": label}
            for variant, options in (
                ("factored, both", {}),
                ("B only", {"project": "B"}),
                ("full, both", {"placement": "full"}),
            ):
                opt = OrthogonalExpertOptimizer(model, **options)
                row[variant] = opt.memory_bytes / 2**20
                opt.remove_hooks()
            rows.append(row)
    return rows


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        "# Orthogonal expert optimizer on SmolLM2-135M-Instruct (CPU-sized run, one seed)",
        "",
        f"Written by `{s['command']}` on {s['date']} ({s['device']}, {s['threads']} thread(s), torch "
        f"{s['torch']}). Training: configs/orthogonal.yaml (= configs/fast.yaml data: {s['limit']} records "
        f"each of ARC-Easy, BoolQ, OBQA, {s['max_steps']} steps of 8, lr 1e-3; orthogonal optimizer with "
        "accumulate_steps 5, orthogonal_steps 1, alpha 1e-3, factored, project both, mean), method and "
        "optimizer as in the rows; seed 0 only. Far too small to rank methods: read it as a smoke "
        "measurement, not a result.",
        "",
        f"- **cos**: mean pairwise cosine similarity of the 2 experts' raw representations E_i(x) (before "
        f"Gram-Schmidt), averaged over {results['similarity_tokens']} tokens of held-out test prompts and "
        "answers (records 100+ of each task's test split) and over the 30 MoE layers; min/max over layers.",
        f"- **accuracy**: `omoe eval --protocol generate --limit {s['eval_limit']}` (first "
        f"{s['eval_limit']} test records of each task; ±{results['binomial_se_pp']:.0f} pp binomial "
        "standard error at 50%).",
        "- **s/step**: mean seconds per optimizer step from metrics.jsonl (forward, backward, optimizer), "
        "all 18 steps; next column: steps 6, 12 and 18 alone (the orthogonal steps of the orthogonal "
        "runs); **x adamw**: s/step over that of the same method with AdamW. The runs ran one after "
        "another in one session on a 2-core machine shared with other jobs: these whole-run ratios "
        "mostly measure that load; the controlled timing below measures the optimizer.",
        "",
        "| run | cos (min-max layer) | ARC-Easy | boolq | openbookqa | mean acc | s/step | s/orth. step | x adamw |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["runs"].items():
        acc = r["accuracy"]
        cos = r.get("similarity")
        cos_text = (
            f"{cos['mean_cos']:.3f} ({cos['min_layer_cos']:.3f}-{cos['max_layer_cos']:.3f})" if cos else "-"
        )
        orth = r.get("mean_orthogonal_step_s")
        base_step = results["runs"].get(f"{name.split(' + ')[0]} + adamw", {}).get("mean_step_s")
        lines.append(
            f"| {name} | {cos_text} | "
            + " | ".join(f"{100 * acc[t]:.1f}" for t in TASKS)
            + f" | {100 * statistics.fmean(acc.values()):.1f} | "
            + (f"{r['mean_step_s']:.2f} | {orth:.2f} | " if "mean_step_s" in r else "- | - | ")
            + (f"{r['mean_step_s'] / base_step:.2f} |" if "mean_step_s" in r and base_step else "- |")
        )
    o = results.get("overhead")
    if o:
        m = o["median_s"]
        lines += [
            "",
            f"Controlled step timing (`step_overhead`: the moe model with AdamW and with the orthogonal "
            f"optimizer stepping in turns, {o['rounds']} rounds, one batch of {o['batch']}; medians, s):",
            "",
            "| part | AdamW | orthogonal, accumulating step | orthogonal, orthogonal step |",
            "|---|---:|---:|---:|",
            f"| forward + backward | {m['forward_backward_adamw']:.3f} | {m['forward_backward_accumulate']:.3f} "
            f"| {m['forward_backward_orthogonal']:.3f} |",
            f"| optimizer step | {m['step_adamw']:.3f} | {m['step_accumulate']:.3f} | {m['step_orthogonal']:.3f} |",
            "",
            "Time per training step relative to AdamW implied by the optimizer-step parts (forward + "
            "backward with and without the statistics hooks differ by less than their run-to-run noise): "
            + "; ".join(f"{k}: {v:.3f}" for k, v in o["implied_step_ratio"].items())
            + ".",
        ]
    lines += [
        "",
        "Memory of the statistics (MiB; meta-device models, max_directions 64; `full` = dense in x in "
        "projectors plus the means for B):",
        "",
        "| shape | adapter | factored, both | B only | full, both |",
        "|---|---|---:|---:|---:|",
    ]
    for row in results["projector_memory_mib"]:
        lines.append(
            f"| {row['shape']} | {row['adapter']} | {row['factored, both']:,.1f} | {row['B only']:,.2f} | "
            f"{row['full, both']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "orthogonal"))
    parser.add_argument("--work", default=str(ROOT / "runs" / "measure-orthogonal"))
    parser.add_argument("--limit", type=int, default=48, help="training records per task")
    parser.add_argument("--max-steps", type=int, default=18)
    parser.add_argument("--eval-limit", type=int, default=40)
    parser.add_argument("--similarity-tokens", type=int, default=128, help="held-out tokens per task")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-base", action="store_true", help="skip the evaluation of the base model")
    parser.add_argument("--overhead-rounds", type=int, default=8, help="rounds of the controlled step timing")
    parser.add_argument(
        "--reuse-runs", action="store_true", help="keep the runs of OUT/results.json; redo timing and memory"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)

    from omoe.models import load_tokenizer

    texts = held_out_texts(args.similarity_tokens, load_tokenizer("smollm2-135m-instruct"), skip=100)
    runs: dict[str, dict] = {}
    previous = json.loads((out / "results.json").read_text()) if args.reuse_runs else None
    if previous:
        runs = previous["runs"]
    elif not args.no_base:
        runs["base model (no adapter)"] = {"accuracy": evaluate(None, work / "eval-base.json", args)}
    for name, overrides in RUNS.items():
        if previous:
            break
        run_dir = train_run(name, overrides, work, args)
        times = step_times(run_dir)
        orth = [t for i, t in enumerate(times) if (i % 6) == 5]  # accumulate_steps 5 + 1 orthogonal
        runs[name] = {
            "similarity": expert_similarity(run_dir, texts),
            "accuracy": evaluate(run_dir, work / f"eval-{run_dir.name}.json", args),
            "mean_step_s": statistics.fmean(times),
            "mean_orthogonal_step_s": statistics.fmean(orth),
            "step_s": times,
            "final_loss": json.loads((run_dir / "train_results.json").read_text())["final_loss"],
        }
        print(json.dumps({name: {k: v for k, v in runs[name].items() if k != "step_s"}}, default=str, allow_nan=False)[:400])
    results = {
        "overhead": step_overhead(texts, args.overhead_rounds, batch=4),
        "overhead_command": "python scripts/measure_orthogonal.py " + " ".join(sys.argv[1:]),
        "settings": previous["settings"]
        if previous
        else {
            "command": "python scripts/measure_orthogonal.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"),
            "device": f"cpu ({platform.processor() or platform.machine()})",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "limit": args.limit,
            "max_steps": args.max_steps,
            "eval_limit": args.eval_limit,
            "seed": 0,
            "config": "configs/orthogonal.yaml",
        },
        "similarity_tokens": sum(len(t) for t in texts),
        "binomial_se_pp": 100 * (0.25 / args.eval_limit) ** 0.5,
        "runs": runs,
        "projector_memory_mib": projector_memory(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
