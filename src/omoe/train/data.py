"""Training examples and the order in which they are seen.

The order is a pure function of ``(seed, epoch)``: epoch ``e`` visits ``randperm(N)`` drawn from a
generator seeded with ``seed + e``, in global batches of ``global_batch_size`` (the last one of an
epoch may be smaller). With ``group_by_length`` (the default) that permutation is cut into
mega-batches of :data:`MEGA_BATCH` global batches, each mega-batch is sorted by length and cut into
global batches, and the order of the full global batches is shuffled with the same generator (a
smaller last one stays last): every global batch then holds examples of similar length, so the
padding of its micro-batches stays small, and which examples share a step still does not depend on
the micro-batch size. A global batch is cut into micro-batches in order and process ``r`` of ``W``
takes micro-batches ``r, r + W, ...``. So the examples, their padding and their micro-batch
neighbours do not depend on the number of processes, and a resumed run needs only the step number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from omoe.data.loader import load_task, mix_tasks
from omoe.data.tokenize import IGNORE_INDEX, collate, tokenize_dataset
from omoe.errors import ConfigError
from omoe.train.config import DataConfig

MEGA_BATCH = 50  # global batches per length-sorted group (Hugging Face's group_by_length uses 50 too)


def load_training_records(data: DataConfig, seed: int) -> list[dict]:
    """The records named by ``data``: a seeded mixture of the bundled tasks' ``data.split``, or ``data_file``."""
    if data.data_file is not None:
        records = load_task(data.task, data_file=data.data_file, limit=data.limit)
        if not records:
            raise ConfigError(f"data file {data.data_file} holds no records")
        return records
    return mix_tasks(list(data.tasks), data.split, seed, limit_per_task=data.limit)


@dataclass
class TrainData:
    """Tokenised examples and the schedule over them."""

    examples: list[dict]
    num_truncated: int
    global_batch_size: int
    micro_batch_size: int
    seed: int
    group_by_length: bool = True

    def __post_init__(self) -> None:
        if not self.examples:
            raise ConfigError("no training examples")
        self._perm_epoch: int | None = None
        self._perm: list[int] = []
        # Label tokens that enter the loss (after the one-position shift) and real tokens per example.
        self.loss_tokens = [int((ex["labels"][1:] != IGNORE_INDEX).sum()) for ex in self.examples]
        self.lengths = [int(ex["attention_mask"].sum()) for ex in self.examples]

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.global_batch_size)

    def permutation(self, epoch: int) -> list[int]:
        """Every example index once: the order of epoch ``epoch``."""
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(len(self.examples), generator=g).tolist()
            self._perm = self._grouped(perm, g) if self.group_by_length else perm
            self._perm_epoch = epoch
        return self._perm

    def _grouped(self, perm: list[int], g: torch.Generator) -> list[int]:
        size, mega = self.global_batch_size, MEGA_BATCH * self.global_batch_size
        batches = []
        for start in range(0, len(perm), mega):
            # a stable sort: examples of equal length keep their random order
            group = sorted(perm[start : start + mega], key=self.lengths.__getitem__)
            batches += [group[i : i + size] for i in range(0, len(group), size)]
        full = [b for b in batches if len(b) == size]
        rest = [i for b in batches if len(b) < size for i in b]  # at most one short batch, the epoch's last
        return [i for k in torch.randperm(len(full), generator=g).tolist() for i in full[k]] + rest

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, index into that epoch's permutation)`` where optimizer step ``step`` starts."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return epoch, within * self.global_batch_size

    def global_batch(self, step: int) -> list[int]:
        epoch, start = self.position(step)
        return self.permutation(epoch)[start : start + self.global_batch_size]

    def micro_batches(self, step: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, list[int]]]:
        """``(micro-batch number within the global batch, example indices)`` for process ``rank``."""
        batch = self.global_batch(step)
        chunks = [batch[i : i + self.micro_batch_size] for i in range(0, len(batch), self.micro_batch_size)]
        return [(m, chunk) for m, chunk in enumerate(chunks) if m % world_size == rank]

    def num_micro_batches(self, step: int) -> int:
        return math.ceil(len(self.global_batch(step)) / self.micro_batch_size)

    def batch_loss_tokens(self, step: int) -> int:
        """Loss tokens of the whole global batch: the loss is their mean, on every process."""
        return sum(self.loss_tokens[i] for i in self.global_batch(step))

    def batch_tokens(self, step: int) -> int:
        return sum(self.lengths[i] for i in self.global_batch(step))

    def collate(self, indices: list[int], pad_token_id: int) -> dict:
        return collate([self.examples[i] for i in indices], pad_token_id)


def build_train_data(tokenizer, records: list[dict], data: DataConfig, global_batch_size: int,
                     micro_batch_size: int, seed: int) -> TrainData:  # fmt: skip
    tokenized = tokenize_dataset(
        tokenizer, records, data.cutoff_len, data.train_on_inputs, prompt=data.prompt, task=data.task
    )
    train_data = TrainData(
        tokenized.examples, tokenized.num_truncated, global_batch_size, micro_batch_size, seed,
        data.group_by_length,
    )  # fmt: skip
    if not any(train_data.loss_tokens):  # the loss would be 0 at every step: nothing is learned
        raise ConfigError(
            f"no training example keeps a response token within data.cutoff_len {data.cutoff_len}: every "
            "prompt fills it; raise data.cutoff_len (python -m omoe.data.stats prints token lengths)"
        )
    return train_data
