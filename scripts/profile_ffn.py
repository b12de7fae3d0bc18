"""Where an OMoE FFN block spends its time: one SmolLM2-shaped MLP (576 -> 1536 -> 576), 8x128 tokens,
forward + backward, frozen base vs the default OMoE (2 experts, soft), one CPU thread.

    .venv/bin/python scripts/profile_ffn.py > docs/bench/ffn-profile.txt

Prints the median step time of both and torch.profiler's table of the OMoE block's operators.
"""

import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaForCausalLM

from omoe import OMoEConfig, get_omoe_model
from omoe.models.shapes import SHAPES


def main() -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    # One block of SmolLM2's shape; a small untied vocabulary (the embeddings are not profiled).
    config = SHAPES["smollm2-135m"].llama_config(num_hidden_layers=1, vocab_size=1000, tie_word_embeddings=False)
    base_mlp = LlamaForCausalLM(config).model.layers[0].mlp.requires_grad_(False)
    model = LlamaForCausalLM(config)
    get_omoe_model(model, OMoEConfig(target_modules=["gate_proj", "up_proj", "down_proj"]))
    omoe_mlp = model.model.layers[0].mlp
    for p in omoe_mlp.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.02)  # trained-like experts: B != 0
    x = torch.randn(8, 128, 576, requires_grad=True)

    def step(mlp):
        mlp(x).pow(2).mean().backward()

    times = {}
    for name, mlp in (("base MLP (frozen)", base_mlp), ("OMoE MLP (k=2, soft)", omoe_mlp)):
        for _ in range(2):
            step(mlp)
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            step(mlp)
            ts.append(time.perf_counter() - t0)
        times[name] = statistics.median(ts)
    ref = times["base MLP (frozen)"]
    for name, t in times.items():
        print(f"{name}: {t * 1000:.1f} ms per forward+backward ({t / ref:.2f}x the base MLP)")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step(omoe_mlp)
    print("\nOMoE MLP, 3 steps:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
