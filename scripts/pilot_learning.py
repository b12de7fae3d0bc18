"""Pilot learning curves: which tasks does the bundled model learn, at which learning rate and budget?

For each task: the untuned model's accuracy, answer spread and majority rate on the task's validation
slice (``--split val``, carved from its train split, never the test set), then for each (method,
learning rate) a short fine-tune in the paper's protocol (MoE-PEFT prompt, one label token as the
answer, cross-entropy on that token only, logits at the last position only) with the same
validation measures every ``--eval-every`` steps. Writes one JSON (rewritten after every run, so an
interrupted pilot keeps what it finished) and prints a table. This script is for choosing the study's
tasks and budget (issue 11); the study itself runs through ``omoe experiment``.

    python scripts/pilot_learning.py --tasks piqa,boolq --methods lora,omoe --lrs 2e-4,1e-3 \
        --steps 300 --eval-every 100 --output docs/pilot/pilot.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from omoe import OMoEConfig, get_omoe_model
from omoe.data.loader import load_task
from omoe.data.prompts import get_format, render
from omoe.data.tasks import get_task
from omoe.eval.batching import pad
from omoe.models.loading import load_model
from omoe.models.logits import selected_logits
from omoe.models.prefix import frozen_prefix

METHODS = {
    "lora": dict(method="lora"),
    "moe": dict(method="moe"),
    "mixlora": dict(method="moe", num_experts=8, top_k=2, router_aux_loss_coef=0.001),
    "omoe": dict(method="omoe"),
}


def encode(tokenizer, task, records, cutoff):
    """Prompt ids (left-truncated to ``cutoff``), the gold label's index and the labels' token ids."""
    label_ids = []
    for text in get_format("moe-peft").responses(task):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            sys.exit(f"pilot: {task.name} label {text!r} is {len(ids)} tokens; the label protocol needs one")
        label_ids.append(ids[0])
    prompts = [tokenizer(render(r, task, "moe-peft")[0])["input_ids"][-cutoff:] for r in records]
    gold = [task.labels.index(r["answer"]) for r in records]
    return prompts, gold, label_ids


def last_logits(model, seqs, pad_id, device, dtype):
    """Next-token logits at each sequence's last token, ``(B, V)`` float32 (right padding; the LM
    head runs on those positions only)."""
    ids, mask = pad(seqs, pad_id, side="right")
    ids, mask = ids.to(device), mask.to(device)
    keep = F.one_hot(mask.sum(1) - 1, ids.shape[1]).bool()  # (B, T)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        return selected_logits(model, ids, mask, keep).float()


@torch.no_grad()
def evaluate(model, data, pad_id, device, dtype, batch=64):
    prompts, gold, label_ids = data
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    preds = [0] * len(prompts)
    gold_lp = [0.0] * len(prompts)
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        logits = last_logits(model, [prompts[i] for i in idx], pad_id, device, dtype)  # (B, V)
        restricted = logits[:, label_ids].log_softmax(-1)  # (B, labels)
        if not torch.isfinite(restricted).all():
            raise FloatingPointError("non-finite label scores")
        for j, i in enumerate(idx):
            preds[i] = int(restricted[j].argmax())
            gold_lp[i] = float(restricted[j, gold[i]])
    n = len(gold)
    acc = sum(p == g for p, g in zip(preds, gold)) / n
    top_share = Counter(preds).most_common(1)[0][1] / n
    return {"acc": acc, "top_share": top_share, "gold_logprob": sum(gold_lp) / n}


def evaluate_all(model, val, pad_id, device, dtype):
    """``val`` is one task's encoded slice or a ``{task: slice}`` dict (multi-task)."""
    if isinstance(val, dict):
        return {name: evaluate(model, v, pad_id, device, dtype) for name, v in val.items()}
    return {"val": evaluate(model, val, pad_id, device, dtype)}


def train_run(base, tokenizer, task, train, val, method, lr, args, device, dtype):
    torch.manual_seed(args.seed)
    blocks = base.config.num_hidden_layers
    layers = f"{blocks - args.top_layers}-{blocks - 1}" if args.top_layers else "all"
    model = get_omoe_model(base, OMoEConfig(**METHODS[method], layers=layers))
    prefix = frozen_prefix(model, model.frozen_depth)  # the frozen bottom blocks, once per sequence
    prefix.__enter__()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    prompts, gold, label_ids = train
    targets = [label_ids[g] for g in gold] if not isinstance(label_ids[0], list) else [ids[g] for ids, g in zip(label_ids, gold)]
    rng = random.Random(args.seed)
    order: list[int] = []
    curve = [{"step": 0, **evaluate_all(model, val, tokenizer.pad_token_id, device, dtype)}]
    losses: list[float] = []
    start = time.time()
    for step in range(1, args.steps + 1):
        if len(order) < args.batch:
            perm = list(range(len(prompts)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[: args.batch], order[args.batch :]
        model.train()
        warm = min(1.0, step / max(1, args.warmup))
        for group in opt.param_groups:
            group["lr"] = lr * warm
        logits = last_logits(model, [prompts[i] for i in idx], tokenizer.pad_token_id, device, dtype)
        target = torch.tensor([targets[i] for i in idx], device=device)
        loss = F.cross_entropy(logits, target)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{getattr(task, 'name', task)} {method} lr {lr}: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            point = evaluate_all(model, val, tokenizer.pad_token_id, device, dtype)
            point.update(step=step, train_loss=sum(losses) / len(losses))
            losses = []
            curve.append(point)
            for name, m in point.items():
                if isinstance(m, dict):
                    print(
                        f"  {name:14s} {method:7s} lr {lr:g} step {step:4d}: val acc {m['acc']:.3f} "
                        f"top {m['top_share']:.2f} gold lp {m['gold_logprob']:.3f} loss {point['train_loss']:.3f} "
                        f"({(time.time() - start) / step:.2f} s/step)",
                        flush=True,
                    )
    seconds = time.time() - start
    prefix.__exit__(None, None, None)
    model.unload()
    return {"task": getattr(task, "name", task), "method": method, "lr": lr, "curve": curve, "seconds": seconds,
            "sec_per_step": seconds / args.steps}


def write(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, allow_nan=False))
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="piqa,social_i_qa,ARC-Easy,boolq,winogrande,openbookqa,hellaswag,ARC-Challenge")
    p.add_argument("--methods", default="lora,omoe")
    p.add_argument("--lrs", default="2e-4,1e-3")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--val-records", type=int, default=400)
    p.add_argument("--cutoff", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="start no new run after this")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--top-layers", type=int, default=0, help="adapters on the top N blocks only (0: all); the "
                   "frozen blocks below are computed once per sequence (omoe.models.prefix)")
    p.add_argument("--multitask", action="store_true", help="one run on the tasks mixed, evaluated on each")
    p.add_argument("--train-per-task", type=int, default=None, help="multi-task: the first N train records of each")
    args = p.parse_args()
    for m in args.methods.split(","):
        if m not in METHODS:
            sys.exit(f"pilot: unknown method {m!r}; allowed: {', '.join(METHODS)}")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as omoe's trainer: denormals make CPU matmuls many times slower
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    base, tokenizer = load_model(device=device)
    for param in base.parameters():
        param.requires_grad_(False)
    hw = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    settings = {**vars(args), "output": str(args.output), "hardware": hw}
    settings["budget_s"] = None if math.isinf(args.budget_s) else args.budget_s
    payload = {"settings": settings, "tasks": {}, "runs": []}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.multitask:
        multitask(base, tokenizer, args, device, dtype, payload)
        return
    for name in args.tasks.split(","):
        task = get_task(name)
        val_records = load_task(task, "val")[: args.val_records]
        val = encode(tokenizer, task, val_records, args.cutoff)
        train = encode(tokenizer, task, load_task(task, "train"), args.cutoff)
        majority = Counter(val[1]).most_common(1)[0][1] / len(val[1])
        with frozen_prefix(base, base.config.num_hidden_layers - args.top_layers if args.top_layers else 0):
            untuned = evaluate(base, val, tokenizer.pad_token_id, device, dtype)
        payload["tasks"][task.name] = {"val_records": len(val_records), "majority": majority, "untuned": untuned,
                                       "train_records": len(train[0])}
        print(f"{task.name}: untuned acc {untuned['acc']:.3f} top {untuned['top_share']:.2f} majority {majority:.3f}",
              flush=True)
        write(args.output, payload)
        for method in args.methods.split(","):
            for lr in (float(x) for x in args.lrs.split(",")):
                if time.time() - t0 > args.budget_s:
                    print(f"  budget reached: skipping {task.name} {method} lr {lr:g}", flush=True)
                    continue
                payload["runs"].append(train_run(base, tokenizer, task, train, val, method, lr, args, device, dtype))
                write(args.output, payload)


def multitask(base, tokenizer, args, device, dtype, payload):
    """One fine-tune per (method, lr) on the tasks' train splits mixed; validation on each task."""
    val, prompts, gold, label_ids = {}, [], [], []
    for name in args.tasks.split(","):
        task = get_task(name)
        val[task.name] = encode(tokenizer, task, load_task(task, "val")[: args.val_records], args.cutoff)
        p, g, ids = encode(tokenizer, task, load_task(task, "train")[: args.train_per_task], args.cutoff)
        prompts += p
        gold += g
        label_ids += [ids] * len(p)
        majority = Counter(val[task.name][1]).most_common(1)[0][1] / len(val[task.name][1])
        payload["tasks"][task.name] = {"majority": majority, "train_records": len(p)}
        print(f"{task.name}: majority {majority:.3f}", flush=True)
    with frozen_prefix(base, base.config.num_hidden_layers - args.top_layers if args.top_layers else 0):
        untuned = evaluate_all(base, val, tokenizer.pad_token_id, device, dtype)
    for name, m in untuned.items():
        payload["tasks"][name]["untuned"] = m
        print(f"{name}: untuned acc {m['acc']:.3f} top {m['top_share']:.2f} gold lp {m['gold_logprob']:.3f}", flush=True)
    for method in args.methods.split(","):
        for lr in (float(x) for x in args.lrs.split(",")):
            payload["runs"].append(train_run(base, tokenizer, args.tasks, (prompts, gold, label_ids), val, method, lr,
                                             args, device, dtype))
            write(args.output, payload)


if __name__ == "__main__":
    main()
