"""The Alpaca prompt template used by LLM-Adapters for training and commonsense evaluation.

LLM-Adapters' ``finetune.py`` / ``commonsense_evaluate.py`` write these templates as indented
triple-quoted f-strings, so their literal strings carry the source indentation (and, depending on
the commit, a trailing space or a stray ``# noqa: E501``). We use the clean Alpaca text, identical for
training and evaluation; ``docs/data.md`` records the difference.
"""

from __future__ import annotations

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Response:\n{output}"
)

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n"
    "### Response:\n{output}"
)


def build_prompt(record: dict, with_output: bool) -> str:
    """Fill the template with a record; ``with_output=False`` stops right after ``### Response:\\n``."""
    template = PROMPT_WITH_INPUT if record.get("input") else PROMPT_NO_INPUT
    return template.format(
        instruction=record["instruction"],
        input=record.get("input", ""),
        output=record["output"] if with_output else "",
    )
