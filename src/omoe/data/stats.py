"""Print a Markdown table of the bundled files: records, answer counts, tokenised lengths.

Run ``python -m omoe.data.stats`` (uses the SmolLM2 tokenizer for the length columns); the table in
``docs/data.md`` is this command's output.
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter

from omoe.data.loader import load_task
from omoe.data.tasks import TASKS
from omoe.data.tokenize import tokenize_dataset


def stats_table(tokenizer) -> str:
    lines = [
        "| task | split | records | answers | tokens median | tokens max | > 256 | > 512 |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for name, task in TASKS.items():
        for split in task.splits:
            records = load_task(task, split)
            counts = Counter(r["answer"] for r in records)
            answers = " ".join(f"{label}:{counts[label]}" for label in task.labels if counts[label])
            lengths = [
                e["input_ids"].numel()
                for e in tokenize_dataset(tokenizer, records, cutoff_len=10**6).examples
            ]
            lines.append(
                f"| {name} | {split} | {len(records)} | {answers} | {statistics.median(lengths):g} | {max(lengths)} "
                f"| {sum(n > 256 for n in lengths)} | {sum(n > 512 for n in lengths)} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="whose tokenizer measures the lengths"
    )
    args = parser.parse_args()
    from omoe.models import load_tokenizer

    print(f"Token counts: prompt + response + EOS, tokenizer of {args.model}.\n")
    print(stats_table(load_tokenizer(args.model)))


if __name__ == "__main__":
    main()
