"""Print Markdown tables of the bundled files: records, answer counts, tokenised lengths in both
prompt formats; and the sizes of the train/val splits.

Run ``python -m omoe.data.stats`` (uses the SmolLM2 tokenizer for the length columns); the table in
``docs/data.md`` is this command's output.
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter

from omoe.data.loader import load_task
from omoe.data.tasks import FULL_TRAIN_SPLIT, TASKS, VAL_SPLIT
from omoe.data.tokenize import tokenize_dataset
from omoe.models import load_tokenizer


def stats_table(tokenizer) -> str:
    lines = [
        "| task | file | records | answers | alpaca median | alpaca max | > 256 | > 512 | moe-peft median | moe-peft max |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, task in TASKS.items():
        for file in task.files:
            records = load_task(task, FULL_TRAIN_SPLIT if file == "train" else file)
            counts = Counter(r["answer"] for r in records)
            answers = " ".join(f"{label}:{counts[label]}" for label in task.labels if counts[label])
            alpaca, moe_peft = (
                [e["input_ids"].numel() for e in tokenize_dataset(tokenizer, records, 10**6, prompt=fmt, task=task).examples]
                for fmt in ("alpaca", "moe-peft")
            )  # fmt: skip
            lines.append(
                f"| {name} | {file} | {len(records)} | {answers} | {statistics.median(alpaca):g} | {max(alpaca)} "
                f"| {sum(n > 256 for n in alpaca)} | {sum(n > 512 for n in alpaca)} "
                f"| {statistics.median(moe_peft):g} | {max(moe_peft)} |"
            )
    return "\n".join(lines)


def splits_table() -> str:
    """Records per split of each train file: ``train`` + ``val`` (+ duplicates of val questions left
    out of train) = ``train+val``."""
    lines = ["| task | train | val | train+val | left out of train (duplicates of a val question) |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, task in TASKS.items():
        if "train" in task.files:
            train, val, whole = (len(load_task(task, s)) for s in ("train", VAL_SPLIT, FULL_TRAIN_SPLIT))
            lines.append(f"| {name} | {train} | {val} | {whole} | {whole - train - val} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="whose tokenizer measures the lengths"
    )
    args = parser.parse_args()
    print(
        f"Token counts per record, tokenizer of {args.model}: alpaca = prompt + response + EOS, "
        "moe-peft = prompt + label token.\n"
    )
    print(stats_table(load_tokenizer(args.model)))
    print("\nSplits of the train files (`val`: min(500, 10%) of the file, seed 0):\n")
    print(splits_table())


if __name__ == "__main__":
    main()
