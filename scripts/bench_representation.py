"""A/B timing of the FFN expert representation (issue 9): ``FFN_s - FFN_0`` (before) against the
adapters' own deltas (now), on one MLP block, forward + backward, in one process.

The two layers share every module (frozen MLP, experts, router, mixer); only the computation of
``E_s`` differs. Variants take turns step by step, in alternating order, so load on the machine
hits both alike; a variant's time is the median over its steps. Prints, per precision, the median
step time of each, their ratio (now / before) and the bytes autograd saves for backward.

    .venv/bin/python scripts/bench_representation.py [--device cuda] [--steps 30]

Default shape: SmolLM2-135M's MLP (hidden 576, intermediate 1536), 8 x 128 tokens, the default
OMoE config (2 experts, soft routing, r 16, alpha 32, dropout 0.05, train mode).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from omoe.layers import LoRAExperts, MoEFeedForward, OrthogonalMixer, Router
from omoe.layers.reference import BeforeMoEFeedForward


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = nn.SiLU()
        for lin in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(lin.weight, std=0.02)
            lin.weight.requires_grad_(False)

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def build(hidden: int, intermediate: int, device: str) -> dict[str, MoEFeedForward]:
    torch.manual_seed(0)
    mlp = GatedMLP(hidden, intermediate)
    experts = {}
    for p in ("gate", "up", "down"):
        lin = getattr(mlp, f"{p}_proj")
        experts[p] = LoRAExperts(
            lin.in_features, lin.out_features, num_experts=2, r=16, alpha=32, dropout=0.05
        )
        nn.init.normal_(experts[p].lora_B, std=1e-3)  # a trained-looking expert, not B = 0
    router, mixer = Router(hidden, 2), OrthogonalMixer()
    now = MoEFeedForward(mlp, router, experts, mixer)
    before = BeforeMoEFeedForward(mlp, router, experts, mixer)
    return {"before": before.to(device).train(), "now": now.to(device).train()}


def saved_bytes(layer, x, grad, dtype) -> int:
    """Bytes of the tensors autograd keeps for one forward (unique storages)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(x, dtype):
        layer(x)
    return sum(storages.values())


def autocast(x, dtype):
    return torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def step(layer, x, grad, dtype, sync, clock) -> float:
    sync()
    t = clock()
    with autocast(x, dtype):
        out = layer(x)
    out.backward(grad)
    sync()
    elapsed = clock() - t
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--tokens", type=int, default=8 * 128)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant and precision")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # On one CPU thread, the thread's CPU time: other processes' load then does not count.
    clock = time.thread_time if not cuda and torch.get_num_threads() == 1 else time.perf_counter
    layers = build(args.hidden, args.intermediate, args.device)
    g = torch.Generator().manual_seed(1)
    # The input needs a gradient, as inside a model whose earlier layers train.
    x = torch.randn(args.tokens, args.hidden, generator=g).to(args.device).requires_grad_(True)
    grad = torch.randn(args.tokens, args.hidden, generator=g).to(args.device)
    print(
        f"device {args.device}, threads {torch.get_num_threads()}, hidden {args.hidden}, intermediate "
        f"{args.intermediate}, tokens {args.tokens}, 2 experts soft, r 16; forward + backward, {args.steps} steps each, "
        f"clock {clock.__name__}"
    )
    print(
        f"{'precision':<10} {'before ms':>10} {'now ms':>10} {'now/before':>11} {'saved MiB before':>17} {'now':>6}"
    )
    for name, dtype in (("float32", None), ("bf16", torch.bfloat16)):
        for layer in layers.values():
            for _ in range(args.warmup):
                step(layer, x, grad, dtype, sync, clock)
        times = {k: [] for k in layers}
        for i in range(args.steps):
            order = list(layers) if i % 2 == 0 else list(reversed(list(layers)))
            for k in order:
                times[k].append(step(layers[k], x, grad, dtype, sync, clock))
        before, now = (statistics.median(times[k]) * 1e3 for k in ("before", "now"))
        mib = {k: saved_bytes(layers[k], x, grad, dtype) / 2**20 for k in layers}
        print(
            f"{name:<10} {before:>10.2f} {now:>10.2f} {now / before:>11.3f} {mib['before']:>17.1f} {mib['now']:>6.1f}"
        )


if __name__ == "__main__":
    main()
