"""Sanity check for the pilots: can LoRA on the top 8 blocks fit 64 ARC-Easy training records in the
paper's protocol (MoE-PEFT prompt, one label token, loss on it only)? It can, within 80-120 steps at
lr 3e-4..3e-3, so the flat validation curves in docs/pilot/ are a failure to generalise, not a broken
training path.

    python scripts/pilot_memorize.py > docs/pilot/cpu-memorize-arc-easy-64.log
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from pilot_learning import encode, evaluate, last_logits

from omoe import OMoEConfig, get_omoe_model
from omoe.data.loader import load_task
from omoe.data.tasks import get_task
from omoe.models.loading import load_model
from omoe.models.prefix import frozen_prefix


def main() -> None:
    torch.set_flush_denormal(True)
    device, dtype = torch.device("cpu"), torch.bfloat16
    base, tokenizer = load_model(device=device)
    task = get_task("ARC-Easy")
    data = encode(tokenizer, task, load_task(task, "train")[:64], 256)
    prompts, gold, label_ids = data
    for lr in (3e-4, 1e-3, 3e-3):
        torch.manual_seed(0)
        model = get_omoe_model(base, OMoEConfig(method="lora", layers="22-29"))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        rng, start = random.Random(0), time.time()
        with frozen_prefix(model, model.frozen_depth):
            for step in range(1, 121):
                idx = rng.sample(range(64), 8)
                model.train()
                logits = last_logits(model, [prompts[i] for i in idx], tokenizer.pad_token_id, device, dtype)
                loss = F.cross_entropy(logits, torch.tensor([label_ids[gold[i]] for i in idx]))
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                if step % 40 == 0:
                    r = evaluate(model, data, tokenizer.pad_token_id, device, dtype)
                    print(
                        f"lr {lr} layers 22-29 step {step} loss {loss.item():.3f} train-acc {r['acc']:.3f} "
                        f"top {r['top_share']:.2f} lp {r['gold_logprob']:.3f} {(time.time() - start) / step:.2f}s/step",
                        flush=True,
                    )
        model.unload()


if __name__ == "__main__":
    main()
