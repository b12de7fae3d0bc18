"""``loglik`` protocol (lm-evaluation-harness style multiple choice).

The choices are parsed out of the instruction (:func:`omoe.data.fields.parse_choices`: ``Answer1: ...
Answer2: ...``, ``Solution1:``, ``Ending1:``, ``Option1:``; boolq's choices are the words ``true`` /
``false``). Each choice's text is scored as the continuation of the prompt (template with an empty
response): the sum of its tokens' log-probabilities. ``acc`` takes the argmax of the sums; ``acc_norm`` divides each sum by the choice's
length in characters first, as lm-eval's ``process_results`` does (``len(choice)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from omoe.data.fields import parse_choices
from omoe.data.loader import DataFormatError
from omoe.data.prompts import build_prompt
from omoe.data.tasks import Task
from omoe.eval.batching import length_sorted_batches, model_device, pad, progress_bar, require_finite
from omoe.models.logits import selected_logits


def continuation_logprobs(
    model,
    contexts: list[list[int]],
    continuations: list[list[int]],
    pad_id: int,
    batch_size: int,
    desc: str,
    progress: bool,
) -> torch.Tensor:
    """Sum of log p(continuation | context) for each pair.

    Returns:
        float64 tensor of shape ``(N,)``.
    """
    device = model_device(model)
    seqs = [[*c, *x] for c, x in zip(contexts, continuations)]
    out = torch.empty(len(seqs), dtype=torch.float64)
    for batch in progress_bar(length_sorted_batches([len(s) for s in seqs], batch_size), desc, progress):
        input_ids, attention_mask = pad([seqs[i] for i in batch], pad_id, side="right")  # (B, T)
        ctx_len = torch.tensor([len(contexts[i]) for i in batch])[:, None]  # (B, 1)
        cont_len = torch.tensor([len(continuations[i]) for i in batch])[:, None]  # (B, 1)
        pos = torch.arange(input_ids.shape[1])[None, :]  # (1, T): logits at pos predict token pos+1
        scored = (pos >= ctx_len - 1) & (pos < ctx_len + cont_len - 1)  # (B, T), never the last column
        rows, cols = scored.nonzero(as_tuple=True)  # (M,), (M,)
        picked = selected_logits(
            model, input_ids.to(device), attention_mask.to(device), scored.to(device)
        ).float()  # (M, V): the continuation's positions only, rows in the order of (rows, cols)
        targets = input_ids[rows, cols + 1].to(device)  # (M,)
        token_lp = picked.log_softmax(-1).gather(1, targets[:, None]).squeeze(1).double().cpu()  # (M,)
        out[batch] = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, rows, token_lp)
    return out


def pick_choices(lls: torch.Tensor, texts: list[str]) -> tuple[int, int]:
    """Indices of the best choice by summed log-likelihood (``acc``) and by log-likelihood per
    character of the choice text (``acc_norm``, lm-eval's ``lls / len(choice)``)."""
    lengths = torch.tensor([len(t) for t in texts], dtype=torch.float64)
    return int(lls.argmax()), int((lls / lengths).argmax())


@dataclass
class LoglikProtocol:
    """Argmax over the summed (and length-normalised) log-likelihoods of the choice texts."""

    name: str = field(default="loglik", init=False)

    def options(self) -> dict:
        return {"acc_norm": "sum log-prob / len(choice) in characters (lm-eval)"}

    def predict(
        self, model, tokenizer, task: Task, records: list[dict], batch_size: int, progress: bool
    ) -> list[dict]:
        parsed = []
        for i, record in enumerate(records):
            try:
                labels, texts = parse_choices(task, record["instruction"])
                if record["answer"] not in labels:
                    raise DataFormatError(
                        f"answer {record['answer']!r} is not among the listed choices {labels}"
                    )
            except DataFormatError as err:
                raise DataFormatError(f"{task.name} record {i}: {err}") from None
            parsed.append((labels, texts))
        prompts = tokenizer([build_prompt(r, with_output=False) for r in records])["input_ids"]
        owner = [i for i, (labels, _) in enumerate(parsed) for _ in labels]  # record index of each pair
        texts = [t for _, choice_texts in parsed for t in choice_texts]
        continuations = tokenizer(texts, add_special_tokens=False)["input_ids"]
        sums = continuation_logprobs(
            model,
            [prompts[i] for i in owner],
            continuations,
            tokenizer.pad_token_id,
            batch_size,
            f"{task.name} [loglik]",
            progress,
        )

        predictions, start = [], 0
        for i, (record, (labels, choice_texts)) in enumerate(zip(records, parsed)):
            lls = sums[start : start + len(labels)]
            start += len(labels)
            require_finite(task.name, i, "choice log-likelihoods", dict(zip(labels, lls.tolist())))
            best, best_norm = pick_choices(lls, choice_texts)
            predicted, predicted_norm = labels[best], labels[best_norm]
            predictions.append(
                {
                    "index": i,
                    "answer": record["answer"],
                    "prediction": predicted,
                    "correct": predicted == record["answer"],
                    "prediction_norm": predicted_norm,
                    "correct_norm": predicted_norm == record["answer"],
                    "no_match": False,
                    "loglik": dict(zip(labels, lls.tolist())),
                }
            )
        return predictions
