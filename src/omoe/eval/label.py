"""``label`` protocol (MoE-PEFT / MixLoRA style): pick the label whose token is most likely next.

The prompt and each label's response come from the prompt format (:mod:`omoe.data.prompts`), the
same as in training. ``moe-peft``: the response is the label itself (`` A``, `` true``), one token
with SmolLM2, scored right after the prompt, as MoE-PEFT's evaluator does. ``alpaca``: every training
response reads ``the correct answer is <label>`` (:data:`ANSWER_TEMPLATE`), so a fine-tuned model does
not emit the label as its first response token. We therefore append the part of the response that is
common to all labels (``the correct answer is`` for boolq, ``the correct answer is answer`` for ARC
with the SmolLM2 tokenizer, where ``answer1`` splits into `` answer`` + ``1``). In both formats we
compare the next-token logits of each label's first distinguishing token, restricted to the task's
labels. The prompt and the appended prefix are tokenised exactly as in training (prompt, then
response, separately), so the scored position is where the fine-tuned model emits the label.
Predictions keep the record's canonical ``answer`` (``answer2``); ``scores`` are keyed by the
format's label names (``B``), and ``gold_label`` is the gold answer's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from omoe.data.prompts import get_format, render_many
from omoe.data.tasks import ANSWER_TEMPLATE, Task
from omoe.errors import ConfigError
from omoe.eval.batching import length_sorted_batches, model_device, pad, progress_bar, require_finite
from omoe.models.logits import selected_logits


def label_tokens(
    tokenizer, labels: tuple[str, ...], template: str = ANSWER_TEMPLATE
) -> tuple[list[int], list[int]]:
    """Shared response prefix and one distinguishing token per label.

    Tokenises ``template`` filled with each label and hands the responses to :func:`response_tokens`.

    Returns:
        ``(prefix_ids, label_ids)``: the common prefix token ids and, aligned with ``labels``, the first
        token where each label's response differs from the others.
    """
    return response_tokens(tokenizer, [template.format(label=label) for label in labels])


def response_tokens(tokenizer, responses: list[str] | tuple[str, ...]) -> tuple[list[int], list[int]]:
    """The longest token prefix common to all responses, and the token right after it for each
    (tokenised without special tokens, as training tokenises a target).

    Returns:
        ``(prefix_ids, label_ids)``, ``label_ids`` aligned with ``responses``.
    """
    labels = tuple(responses)
    seqs = tokenizer(list(labels), add_special_tokens=False)["input_ids"]
    k = 0
    while all(len(s) > k for s in seqs) and len({s[k] for s in seqs}) == 1:
        k += 1
    if any(len(s) <= k for s in seqs):
        raise ConfigError(
            f"labels {labels} are not distinguishable by the tokenizer: one response is a prefix of another"
        )
    label_ids = [s[k] for s in seqs]
    if len(set(label_ids)) != len(labels):
        raise ConfigError(
            f"labels {labels} share their first distinguishing token; the label protocol cannot score them"
        )
    return seqs[0][:k], label_ids


def next_token_scores(
    model,
    inputs: list[list[int]],
    token_ids: list[int],
    pad_id: int,
    batch_size: int,
    desc: str = "",
    progress: bool = False,
) -> torch.Tensor:
    """Logits of ``token_ids`` as the next token after each input sequence.

    Returns:
        float32 tensor of shape ``(N, len(token_ids))``. The LM head runs on each row's last position
        only; batches are length-sorted and right-padded, so real tokens never attend to pads and
        keep their positions.
    """
    device = model_device(model)
    scores = torch.empty(len(inputs), len(token_ids))  # (N, labels)
    index = torch.tensor(token_ids, device=device)
    for batch in progress_bar(length_sorted_batches([len(s) for s in inputs], batch_size), desc, progress):
        input_ids, attention_mask = pad([inputs[i] for i in batch], pad_id, side="right")
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        last = attention_mask.sum(1) - 1  # (B,) position of each row's last real token
        keep = torch.nn.functional.one_hot(last, input_ids.shape[1]).bool()  # (B, T)
        next_logits = selected_logits(model, input_ids, attention_mask, keep)  # (B, V)
        scores[batch] = next_logits[:, index].float().cpu()  # (B, labels)
    return scores


@dataclass
class LabelProtocol:
    """Argmax over the labels' next-token logits after the common response prefix."""

    prompt: str = field(default="alpaca", metadata={"help": "prompt format: alpaca or moe-peft"})
    name: str = field(default="label", init=False)

    def __post_init__(self) -> None:
        get_format(self.prompt)

    def options(self) -> dict:
        return dict(get_format(self.prompt).label_options)

    def predict(
        self, model, tokenizer, task: Task, records: list[dict], batch_size: int, progress: bool
    ) -> list[dict]:
        fmt = get_format(self.prompt)
        names = fmt.label_names(task)  # the format's name of each of task.labels
        prefix, label_ids = response_tokens(tokenizer, fmt.responses(task))
        prompts = tokenizer(render_many(records, task, self.prompt)[0])["input_ids"]
        inputs = [[*p, *prefix] for p in prompts]
        scores = next_token_scores(
            model, inputs, label_ids, tokenizer.pad_token_id, batch_size, f"{task.name} [label]", progress
        )  # (N, labels)

        predictions = []
        for i, record in enumerate(records):
            row = dict(zip(names, scores[i].tolist()))
            require_finite(task.name, i, "label scores (next-token logits)", row)
            predicted = task.labels[int(scores[i].argmax())]
            predictions.append(
                {
                    "index": i,
                    "answer": record["answer"],
                    "prediction": predicted,
                    "correct": predicted == record["answer"],
                    "no_match": False,
                    "gold_label": names[task.labels.index(record["answer"])],
                    "scores": row,
                }
            )
        return predictions
