"""The numbers of docs/method.md, "Numerics" (issue 9): bf16 fidelity, float16 skipped steps, the
first-step gradient and what Adam makes of it. Before / now where the old representation
(``FFN_s - FFN_0``, kept in scripts/bench_representation.py) can be swapped in.

    .venv/bin/python scripts/measure_numerics.py [--out docs/bench/numerics/results.json]

CPU, a few minutes on 2 cores. Writes the JSON and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from omoe import OMoEConfig, get_omoe_model
from omoe.layers import LoRAExperts, MoEFeedForward, OrthogonalMixer, Router
from omoe.models.testing import tiny_llama

sys.path.insert(0, str(Path(__file__).parent))
from bench_representation import BeforeMoEFeedForward, GatedMLP

SHAPES = {"llama2-7b": (4096, 11008), "smollm2-135m": (576, 1536)}


def use_before(layer: MoEFeedForward) -> None:
    """Give ``layer`` the pre-issue-9 representation (and bf16/fp16 B z as before)."""
    layer.__class__ = BeforeMoEFeedForward
    for e in layer.omoe_experts.values():
        e.float32_up = False


def fidelity(shape: str, relative_size: float, before: bool) -> dict:
    """Median and minimum cosine (per slot and token) of E' under bf16 autocast against float32."""
    hidden, intermediate = SHAPES[shape]
    torch.manual_seed(0)
    mlp = GatedMLP(hidden, intermediate)
    experts = {}
    for p in ("gate", "up", "down"):
        lin = getattr(mlp, f"{p}_proj")
        experts[p] = LoRAExperts(lin.in_features, lin.out_features, num_experts=2, r=16, alpha=32)
        torch.nn.init.normal_(experts[p].lora_B)
    layer = MoEFeedForward(mlp, Router(hidden, 2), experts, OrthogonalMixer()).eval()
    layer.capture = True
    x = torch.randn(8, hidden)

    def capture(dtype):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            layer(x)
        return layer.last_capture.raw.float(), layer.last_capture.mixed.float()

    ffn0 = mlp(x).norm(dim=-1)
    for _ in range(2):  # scale B so that the median |E| / |FFN_0| is relative_size (float32, now)
        raw, _ = capture(None)
        ratio = (raw.norm(dim=-1) / ffn0).median().item()
        with torch.no_grad():
            for e in experts.values():
                e.lora_B.mul_(relative_size / ratio)
    raw, q32 = capture(None)
    measured = (raw.norm(dim=-1) / ffn0).median().item()
    if before:
        use_before(layer)
    _, q16 = capture(torch.bfloat16)
    cos = torch.nn.functional.cosine_similarity(q16, q32, dim=-1).flatten()
    return {"relative_size": measured, "cos_median": cos.median().item(), "cos_min": cos.min().item()}


def fp16_run(config: OMoEConfig, before: bool, steps: int = 10) -> dict:
    """float16 autocast + GradScaler + AdamW on the tiny LLaMA: skipped steps and losses."""
    torch.manual_seed(0)
    model = get_omoe_model(tiny_llama(0, vocab_size=128), config).train()
    if before:
        for m in model.modules():
            if isinstance(m, MoEFeedForward):
                use_before(m)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    skipped, losses = 0, []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped += scaler.get_scale() < scale
        opt.zero_grad()
        losses.append(round(loss.item(), 4))
    return {"steps": steps, "skipped": skipped, "final_scale": scaler.get_scale(), "losses": losses}


def first_steps(
    config: OMoEConfig, clip: float | None, steps: int = 60, report=(1, 2, 5, 10, 20, 40, 60)
) -> list:
    """float32 AdamW (lr 1e-3, no weight decay) on the tiny LLaMA: the global gradient norm (before
    clipping), and the mean |update| / lr of the experts' B and of the attention LoRA's B."""
    torch.manual_seed(0)
    model = get_omoe_model(tiny_llama(0, vocab_size=128), config).train()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lr = 1e-3
    opt = torch.optim.AdamW(named.values(), lr=lr, weight_decay=0.0)
    groups = {
        "experts_B": [p for n, p in named.items() if "mlp.omoe_experts" in n and n.endswith("lora_B")],
        "attention_B": [p for n, p in named.items() if "self_attn" in n and n.endswith("lora_B")],
        "mlp_lora_B": [
            p for n, p in named.items() if "mlp" in n and "omoe_lora" in n and n.endswith("lora_B")
        ],
    }
    groups = {k: v for k, v in groups.items() if v}
    ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    rows = []
    for step in range(1, steps + 1):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(named.values(), clip if clip else float("inf"))
        start = {k: [p.detach().clone() for p in v] for k, v in groups.items()}
        opt.step()
        opt.zero_grad()
        if step in report:
            row = {"step": step, "loss": round(loss.item(), 4), "grad_norm": norm.item()}
            for k, ps in groups.items():
                moved = [(p.detach() - s).abs().mean().item() / lr for p, s in zip(ps, start[k])]
                row[f"{k}_update_over_lr"] = round(sum(moved) / len(moved), 4)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/bench/numerics/results.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = {"torch": torch.__version__, "fidelity": {}, "fp16": {}, "first_steps": {}}
    for shape in SHAPES:
        for size in (1e-4, 1e-3):
            for when in ("before", "now"):
                out["fidelity"][f"{shape}/{size:g}/{when}"] = fidelity(shape, size, when == "before")
    cases = {"lora": OMoEConfig(method="lora", dropout=0.0), "omoe": OMoEConfig(dropout=0.0)}
    for name, cfg in cases.items():
        for when in ("before", "now") if name == "omoe" else ("now",):
            out["fp16"][f"{name}/{when}"] = fp16_run(cfg, when == "before")
    for name, cfg in cases.items():
        for clip in (None, 1.0):
            out["first_steps"][f"{name}/clip={clip}"] = first_steps(cfg, clip)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, allow_nan=False) + "\n")
    for key, value in out["fidelity"].items():
        print(
            f"fidelity {key}: |E|/|FFN0| {value['relative_size']:.2g}, cos median {value['cos_median']:.5f}"
        )
    for key, value in out["fp16"].items():
        print(
            f"fp16 {key}: skipped {value['skipped']} of {value['steps']}, final scale {value['final_scale']:g}"
        )
    for key, rows in out["first_steps"].items():
        for row in rows:
            print(f"first steps {key}: {row}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
