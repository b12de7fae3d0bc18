"""``generate`` protocol (LLM-Adapters'; the OMoE paper's numbers are ``label`` on the moe-peft prompt).

The prompt is the Alpaca template with an empty response. The model decodes greedily (or with beam
search) for at most ``max_new_tokens`` tokens; the task's regex is applied to the new text and its
FIRST match is the prediction. No match counts as wrong and is counted in ``no_match``.

Batches are LEFT-padded with an attention mask; ``generate`` derives position ids from the mask, so
a prompt gets the same tokens whatever it is batched with. LLM-Adapters passed no attention mask,
which made its batched results depend on the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omoe.data.prompts import build_prompt
from omoe.data.tasks import Task
from omoe.eval.batching import length_sorted_batches, model_device, pad, progress_bar
from omoe.options import check_int


@dataclass
class GenerateProtocol:
    """Greedy/beam generation followed by regex answer extraction."""

    max_new_tokens: int = field(default=32, metadata={"help": "generation length limit (LLM-Adapters: 32)"})
    num_beams: int = field(default=1, metadata={"help": "1 = greedy decoding; >1 = beam search"})
    name: str = field(default="generate", init=False)

    def __post_init__(self) -> None:
        for key in ("max_new_tokens", "num_beams"):
            check_int(key, getattr(self, key), 1)

    def options(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": False}

    def generate_ids(
        self,
        model,
        tokenizer,
        prompts: list[list[int]],
        batch_size: int,
        desc: str = "",
        progress: bool = False,
    ) -> list[list[int]]:
        """New token ids for each tokenised prompt, cut after the first EOS (batch padding removed)."""
        from transformers import GenerationConfig

        config = GenerationConfig(
            do_sample=False,
            num_beams=self.num_beams,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        device = model_device(model)
        result: list[list[int]] = [[] for _ in prompts]
        batches = length_sorted_batches([len(p) for p in prompts], batch_size)
        for batch in progress_bar(batches, desc, progress):
            input_ids, attention_mask = pad([prompts[i] for i in batch], tokenizer.pad_token_id, side="left")
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
            )
            sequences = out.sequences if hasattr(out, "sequences") else out  # (B, T + new)
            for row, i in enumerate(batch):
                new = sequences[row, input_ids.shape[1] :].tolist()
                if tokenizer.eos_token_id in new:  # rows that stopped early are padded after their EOS
                    new = new[: new.index(tokenizer.eos_token_id) + 1]
                result[i] = new
        return result

    def predict(
        self, model, tokenizer, task: Task, records: list[dict], batch_size: int, progress: bool
    ) -> list[dict]:
        prompts = tokenizer([build_prompt(r, with_output=False) for r in records])["input_ids"]
        new_ids = self.generate_ids(
            model, tokenizer, prompts, batch_size, f"{task.name} [generate]", progress
        )
        texts = tokenizer.batch_decode(new_ids, skip_special_tokens=True)
        predictions = []
        for i, (record, text) in enumerate(zip(records, texts)):
            extracted = task.extract(text)
            predictions.append(
                {
                    "index": i,
                    "answer": record["answer"],
                    "prediction": extracted,
                    "correct": extracted == record["answer"],
                    "no_match": extracted is None,
                    "generation": text,
                }
            )
        return predictions
