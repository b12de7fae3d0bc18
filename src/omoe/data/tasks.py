"""Registry of the eight commonsense tasks of LLM-Adapters (Hu et al., 2023).

Each task knows its label set, the answer-extraction regex of LLM-Adapters'
``commonsense_evaluate.py`` (``re.findall`` on the stripped generation, first match wins), the text
its instructions start with, the marker that introduces each choice in the instruction
(``Answer1: ...``) and its bundled files.

Splits: each bundled file is a split of its own name (``train``, ``test``, ``sample``). A task with a
train file has two more: ``val``, a fixed seeded slice of the train file (:func:`val_indices`), and
``train+val``, the whole train file; its ``train`` split is the train file without the ``val`` slice,
so a model trained on ``train`` has never seen a ``val`` record.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from omoe.errors import ConfigError

# Every bundled record's ``output`` is this text with its ``answer`` filled in.
ANSWER_TEMPLATE = "the correct answer is {label}"

VAL_SPLIT = "val"
FULL_TRAIN_SPLIT = "train+val"
VAL_MAX, VAL_SEED = 500, 0  # val = min(500, 10%) of a train file, drawn with seed 0


def val_indices(n: int) -> list[int]:
    """Indices (sorted) of the ``val`` slice of a train file of ``n`` records: ``min(500, n // 10)``
    of them, drawn with ``random.Random(0)``; the same for every task and Python version."""
    k = min(VAL_MAX, n // 10)
    return sorted(random.Random(VAL_SEED).sample(range(n), k))


@dataclass(frozen=True)
class Task:
    """One benchmark: how its answers look and how to read them back from a generation."""

    name: str = field(metadata={"help": "task name, as in LLM-Adapters' --dataset"})
    labels: tuple[str, ...] = field(metadata={"help": "allowed values of a record's `answer`"})
    pattern: str = field(
        metadata={"help": "LLM-Adapters' extraction regex; the first match is the prediction"}
    )
    instruction_prefix: str = field(
        metadata={
            "help": "the text every LLM-Adapters instruction of the task starts with, before the question"
        }
    )
    choice_marker: str | None = field(
        metadata={
            "help": "capitalised label stem that introduces each choice ('Answer' -> 'Answer1:'); None: the labels are the choices"
        }
    )
    files: tuple[str, ...] = field(metadata={"help": "bundled files <task>/<file>.json.gz, each a split"})
    eval_split: str = field(metadata={"help": "split evaluated when none is given"})

    def __post_init__(self) -> None:
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"task {self.name}: labels must be distinct and non-empty, got {self.labels}")
        if self.eval_split not in self.files:
            raise ConfigError(f"task {self.name}: eval_split {self.eval_split!r} is not one of {self.files}")
        re.compile(self.pattern)

    @property
    def splits(self) -> tuple[str, ...]:
        """Every split that loads: the bundled files, and ``val`` / ``train+val`` where a train file ships."""
        derived = (VAL_SPLIT, FULL_TRAIN_SPLIT) if "train" in self.files else ()
        return (*self.files, *derived)

    def extract(self, text: str) -> str | None:
        """Return the first match of the task's regex in ``text`` (stripped), or None if nothing matches."""
        match = re.search(self.pattern, text.strip())
        return match.group(0) if match else None


def _numbered(stem: str, n: int) -> tuple[str, ...]:
    return tuple(f"{stem}{i}" for i in range(1, n + 1))


# The regexes are copied from LLM-Adapters' extract_answer(); note that social_i_qa and openbookqa
# share ARC's `answer1..answer5` regex, so a generated `answer5` there is extracted and counted wrong.
_ANSWER_REGEX = r"answer1|answer2|answer3|answer4|answer5"

_QUESTION = "Please choose the correct answer to the question: "
_TRAIN_TEST = ("train", "test")

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("boolq", ("true", "false"), r"true|false",
             "Please answer the following question with true or false, question: ", None, _TRAIN_TEST, "test"),
        Task("piqa", _numbered("solution", 2), r"solution1|solution2",
             "Please choose the correct solution to the question: ", "Solution", _TRAIN_TEST, "test"),
        Task("social_i_qa", _numbered("answer", 3), _ANSWER_REGEX, _QUESTION, "Answer", ("train", "sample"),
             "sample"),
        Task("ARC-Challenge", _numbered("answer", 5), _ANSWER_REGEX, _QUESTION, "Answer", _TRAIN_TEST, "test"),
        Task("ARC-Easy", _numbered("answer", 5), _ANSWER_REGEX, _QUESTION, "Answer", _TRAIN_TEST, "test"),
        Task("openbookqa", _numbered("answer", 4), _ANSWER_REGEX, _QUESTION, "Answer", _TRAIN_TEST, "test"),
        Task("hellaswag", _numbered("ending", 4), r"ending1|ending2|ending3|ending4",
             "Please choose the correct ending to complete the given sentence: ", "Ending", _TRAIN_TEST, "test"),
        Task("winogrande", _numbered("option", 2), r"option1|option2",
             "Please choose the correct answer to fill in the blank to complete the given sentence: ", "Option",
             ("train", "sample"), "sample"),
    )
}  # fmt: skip

TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(task: str | Task) -> Task:
    """Look a task up by name; a :class:`Task` is returned as is."""
    if isinstance(task, Task):
        return task
    try:
        return TASKS[task]
    except KeyError:
        raise ConfigError(f"unknown task {task!r}; valid tasks: {', '.join(TASK_NAMES)}") from None


def parse_task_list(spec: str) -> list[Task]:
    """Parse a comma-separated list such as ``"ARC-Easy,boolq"``; duplicates and blanks are errors."""
    names = [s.strip() for s in spec.split(",")]
    if any(not n for n in names):
        raise ConfigError(
            f"empty task name in {spec!r}; give comma-separated names from: {', '.join(TASK_NAMES)}"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"task listed twice in {spec!r}; give each task once")
    return [get_task(n) for n in names]
