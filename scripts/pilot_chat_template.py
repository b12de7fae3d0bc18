"""Untuned accuracy of the bundled model on 200 validation records per task, with the MoE-PEFT prompt raw
(as the paper) or wrapped in the Instruct model's chat template (with or without the trailing
"Answer:"), scored by the label tokens' next-token logits. Does the chat template unlock any
multiple-choice ability? (No: it spreads the answers but leaves accuracy at chance.)

    python scripts/pilot_chat_template.py > docs/pilot/cpu-chat-template.log
"""

from __future__ import annotations

from collections import Counter

import torch

from omoe.data.loader import load_task
from omoe.data.prompts import get_format, render
from omoe.data.tasks import get_task
from omoe.eval.batching import pad
from omoe.models.loading import load_model
from omoe.models.logits import selected_logits

TASKS = ("ARC-Easy", "piqa", "social_i_qa", "openbookqa")
VARIANTS = ("raw", "chat", "chat-noanswer")


def encode(tokenizer, task, record, variant: str) -> tuple[list[int], list[int]]:
    """Prompt ids and the labels' token ids for one record."""
    prompt, _ = render(record, task, "moe-peft")
    labels = get_format("moe-peft").responses(task)[: len(task.labels)]
    if variant == "raw":
        ids = tokenizer(prompt)["input_ids"]
        return ids, [tokenizer(text, add_special_tokens=False)["input_ids"][0] for text in labels]
    body = prompt.rsplit("\n", 1)[0] if variant == "chat-noanswer" else prompt
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids, [tokenizer(t.strip(), add_special_tokens=False)["input_ids"][0] for t in labels]


@torch.no_grad()
def run(model, tokenizer, name: str, variant: str, n: int = 200) -> None:
    task = get_task(name)
    records = load_task(task, "val")[:n]
    encoded = [encode(tokenizer, task, r, variant) for r in records]
    label_ids = encoded[0][1]
    gold = [task.labels.index(r["answer"]) for r in records]
    preds: list[int] = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for start in range(0, len(encoded), 16):
            ids, mask = pad([e[0] for e in encoded[start : start + 16]], tokenizer.pad_token_id, side="right")
            keep = torch.nn.functional.one_hot(mask.sum(1) - 1, ids.shape[1]).bool()  # (B, T)
            logits = selected_logits(model, ids, mask, keep).float()[:, label_ids]  # (B, labels)
            preds += logits.argmax(-1).tolist()
    acc = sum(p == g for p, g in zip(preds, gold)) / len(gold)
    top = Counter(preds).most_common(1)[0][1] / len(preds)
    majority = Counter(gold).most_common(1)[0][1] / len(gold)
    print(f"{name} {variant} acc {acc:.3f} top {top:.2f} maj {majority:.3f}", flush=True)


def main() -> None:
    torch.set_flush_denormal(True)
    model, tokenizer = load_model(device=torch.device("cpu"))
    model.eval()
    for name in TASKS:
        for variant in VARIANTS:
            run(model, tokenizer, name, variant)


if __name__ == "__main__":
    main()
