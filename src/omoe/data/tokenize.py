"""Turn records into training examples: prompt + target (+ EOS), with the prompt masked out of the loss.

The prompt and the target of :func:`omoe.data.prompts.render` are tokenised separately and
concatenated, so the prompt's tokens are exactly the tokens an evaluation prompt has, and the first
target token is the first token the model must emit after it (the token the ``label`` protocol
scores). Format ``alpaca``: prompt = template with an empty response, target = the record's
``output``, then EOS. Format ``moe-peft``: MoE-PEFT's wording, target = `` <label>`` (one token with
SmolLM2), no EOS.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from omoe.data.prompts import get_format, render_many
from omoe.errors import ConfigError
from omoe.options import check_int

IGNORE_INDEX = -100


class TokenizedData(NamedTuple):
    """Examples from :func:`tokenize_dataset` and how many of them were cut at ``cutoff_len``."""

    examples: list[dict]
    num_truncated: int


def tokenize_example(
    tokenizer,
    record: dict,
    cutoff_len: int = 512,
    train_on_inputs: bool = False,
    prompt: str = "alpaca",
    task=None,
) -> dict:
    """Tokenise one record (``prompt``, ``task``: see :func:`tokenize_dataset`).

    Returns:
        dict with ``input_ids``, ``labels``, ``attention_mask`` (1-D LongTensors of shape ``(T,)``,
        ``T <= cutoff_len``) and ``truncated`` (bool). ``labels`` is ``input_ids`` with the prompt
        positions set to -100 unless ``train_on_inputs``.
    """
    return tokenize_dataset(tokenizer, [record], cutoff_len, train_on_inputs, prompt, task).examples[0]


def tokenize_dataset(
    tokenizer,
    records: list[dict],
    cutoff_len: int = 512,
    train_on_inputs: bool = False,
    prompt: str = "alpaca",
    task=None,
) -> TokenizedData:
    """Tokenise records in one batched tokenizer call per part (prompt, target).

    ``prompt`` is the prompt format (``alpaca`` or ``moe-peft``); ``task`` names the records' task
    where they carry no ``"task"`` key (``moe-peft`` needs it, to word the prompt). Sequences longer
    than ``cutoff_len`` keep their first ``cutoff_len`` tokens (the EOS, and possibly the answer, are
    lost); their number is returned so callers can report it.
    """
    check_int("cutoff_len", cutoff_len, 1)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token; set tokenizer.eos_token before tokenising")
    tail = [eos] if get_format(prompt).train_eos else []
    if not records:
        return TokenizedData([], 0)
    prompts, targets = render_many(records, task, prompt)
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]

    examples, num_truncated = [], 0
    for p, r in zip(prompt_ids, target_ids):
        ids = torch.tensor([*p, *r, *tail], dtype=torch.long)  # (T_full,)
        labels = ids.clone()
        if not train_on_inputs:
            labels[: len(p)] = IGNORE_INDEX
        truncated = ids.numel() > cutoff_len
        num_truncated += truncated
        examples.append(
            {
                "input_ids": ids[:cutoff_len],
                "labels": labels[:cutoff_len],
                "attention_mask": torch.ones(min(ids.numel(), cutoff_len), dtype=torch.long),
                "truncated": truncated,
            }
        )
    return TokenizedData(examples, num_truncated)


def collate(batch: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Right-pad a list of examples into a training batch.

    Returns:
        dict of LongTensors of shape ``(B, T)``: ``input_ids`` padded with ``pad_token_id``,
        ``attention_mask`` padded with 0, ``labels`` padded with -100.
    """
    if not batch:
        raise ConfigError("collate needs at least one example")
    longest = max(ex["input_ids"].numel() for ex in batch)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    out = {
        "input_ids": torch.full((len(batch), longest), pad_token_id, dtype=torch.long),  # (B, T)
        "attention_mask": torch.zeros(len(batch), longest, dtype=torch.long),
        "labels": torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long),
    }
    for i, ex in enumerate(batch):
        n = ex["input_ids"].numel()
        out["input_ids"][i, :n] = ex["input_ids"]
        out["attention_mask"][i, :n] = ex["attention_mask"]
        out["labels"][i, :n] = ex["labels"]
    return out
