"""Library entry point: score one task's records with one protocol.

The three protocols answer different questions and their accuracies are NOT comparable; every
metrics dict carries its ``protocol`` and its ``prompt`` format. Only ``label`` reads the
``moe-peft`` prompt (MoE-PEFT's own protocol): ``generate`` extracts LLM-Adapters' answer words
(``answer2``) from a generation and ``loglik`` scores the choice texts after the Alpaca prompt, so
both are defined for ``alpaca`` only.
"""

from __future__ import annotations

import time
from collections import Counter

import torch

from omoe.data.prompts import PROMPT_FORMATS, get_format
from omoe.data.tasks import Task, get_task
from omoe.errors import ConfigError
from omoe.eval.batching import model_device
from omoe.eval.generate import GenerateProtocol
from omoe.eval.label import LabelProtocol
from omoe.eval.loglik import LoglikProtocol
from omoe.models.precision import autocast, autocast_dtype, precision_name
from omoe.models.prefix import frozen_prefix
from omoe.options import check_int

PROTOCOLS = {"generate": GenerateProtocol, "label": LabelProtocol, "loglik": LoglikProtocol}
# The prompt formats each protocol reads (see the module docstring).
PROTOCOL_PROMPTS = {"generate": ("alpaca",), "label": PROMPT_FORMATS, "loglik": ("alpaca",)}


def get_protocol(name: str, max_new_tokens: int = 32, num_beams: int = 1, prompt: str = "alpaca"):
    """Build a protocol object by name; generation options apply to ``generate`` only, the prompt
    format must be one the protocol reads (:data:`PROTOCOL_PROMPTS`)."""
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; allowed: {', '.join(PROTOCOLS)}")
    get_format(prompt)
    if prompt not in PROTOCOL_PROMPTS[name]:
        readers = [p for p, formats in PROTOCOL_PROMPTS.items() if prompt in formats]
        raise ConfigError(
            f"protocol {name} reads the {'/'.join(PROTOCOL_PROMPTS[name])} prompt only; "
            f"with prompt {prompt} use protocol {' or '.join(readers)}"
        )
    if name == "generate":
        return GenerateProtocol(max_new_tokens=max_new_tokens, num_beams=num_beams)
    if (max_new_tokens, num_beams) != (32, 1):
        raise ConfigError(f"max_new_tokens/num_beams apply to protocol generate only, not {name}")
    if name == "label":
        return LabelProtocol(prompt=prompt)
    return PROTOCOLS[name]()


def evaluate(
    model,
    tokenizer,
    task: str | Task,
    records: list[dict],
    protocol: str,
    batch_size: int = 8,
    *,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    progress: bool = True,
    precision: str = "auto",
    prompt: str = "alpaca",
) -> tuple[dict, list[dict]]:
    """Evaluate ``model`` on ``records`` of ``task``.

    ``model`` is a Hugging Face causal LM or a wrapper with the same ``generate`` and
    ``__call__(input_ids=, attention_mask=) -> .logits`` (e.g. ``OMoEModel``). It is put in eval mode
    for the duration and restored afterwards. The tokenizer needs a pad and an EOS token.
    ``precision`` (auto, fp32, bf16, fp16) is the autocast of :mod:`omoe.models.precision`; the
    metrics record the one used. ``prompt`` is the prompt format (``alpaca``, or ``moe-peft`` with
    the ``label`` protocol): evaluate with the format the model was trained with.

    Returns:
        ``(metrics, predictions)``: metrics has ``task``, ``protocol``, ``prompt``, ``n``, ``correct``,
        ``accuracy``, ``no_match``, ``seconds``, ``precision`` (and ``acc_norm`` for ``loglik``);
        predictions has one dict per record with ``index``, ``answer``, ``prediction``, ``correct``
        and protocol details.
    """
    task = get_task(task)
    proto = get_protocol(protocol, max_new_tokens=max_new_tokens, num_beams=num_beams, prompt=prompt)
    check_int("batch_size", batch_size, 1)
    if not records:
        raise ConfigError(f"no records to evaluate for task {task.name}")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ConfigError(
            "the tokenizer needs a pad and an EOS token (omoe.models.load_model sets pad = eos)"
        )

    device = model_device(model)
    amp_dtype = autocast_dtype(precision, device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as in training: SiLU's denormal tails slow CPU arithmetic 3-4x
    was_training = getattr(model, "training", False)
    model.eval()
    start = time.perf_counter()
    try:
        # frozen_prefix: the blocks below the lowest adapter come from a cache shared with training
        depth = getattr(model, "frozen_depth", 0)
        with torch.inference_mode(), autocast(amp_dtype, device), frozen_prefix(model, depth):
            predictions = proto.predict(model, tokenizer, task, records, batch_size, progress)
    finally:
        if was_training:
            model.train()
    seconds = time.perf_counter() - start

    for p in predictions:
        p["task"] = task.name
        p["protocol"] = proto.name
        p["prompt"] = prompt
    n = len(predictions)
    correct = sum(p["correct"] for p in predictions)
    metrics = {
        "task": task.name,
        "protocol": proto.name,
        "prompt": prompt,
        "n": n,
        "correct": correct,
        "accuracy": correct / n,
        "no_match": sum(p["no_match"] for p in predictions),
        "seconds": round(seconds, 3),
        "precision": precision_name(amp_dtype),
        "options": proto.options(),
    }
    metrics.update(answer_counts(predictions))
    if proto.name == "loglik":
        metrics["acc_norm"] = sum(p["correct_norm"] for p in predictions) / n
    return metrics, predictions


def answer_counts(predictions: list[dict]) -> dict[str, dict[str, int]]:
    """How often each answer was predicted (no-matches left out) and how often each is the gold
    answer, most frequent first: shows at a glance whether a model answers the same thing to every
    question, which accuracy alone hides (a constant ``true`` scores BoolQ's majority rate)."""
    predicted = Counter(p["prediction"] for p in predictions if not p.get("no_match"))
    gold = Counter(p["answer"] for p in predictions)
    return {"prediction_counts": dict(predicted.most_common()), "answer_counts": dict(gold.most_common())}
