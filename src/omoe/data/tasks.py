"""Registry of the eight commonsense tasks of LLM-Adapters (Hu et al., 2023).

Each task knows its label set, the answer-extraction regex of LLM-Adapters'
``commonsense_evaluate.py`` (``re.findall`` on the stripped generation, first match wins), the
marker that introduces each choice in the instruction (``Answer1: ...``) and its bundled splits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from omoe.errors import ConfigError

# Every bundled record's ``output`` is this text with its ``answer`` filled in.
ANSWER_TEMPLATE = "the correct answer is {label}"


@dataclass(frozen=True)
class Task:
    """One benchmark: how its answers look and how to read them back from a generation."""

    name: str = field(metadata={"help": "task name, as in LLM-Adapters' --dataset"})
    labels: tuple[str, ...] = field(metadata={"help": "allowed values of a record's `answer`"})
    pattern: str = field(
        metadata={"help": "LLM-Adapters' extraction regex; the first match is the prediction"}
    )
    choice_marker: str | None = field(
        metadata={
            "help": "capitalised label stem that introduces each choice ('Answer' -> 'Answer1:'); None: the labels are the choices"
        }
    )
    splits: tuple[str, ...] = field(metadata={"help": "bundled splits, files <task>/<split>.json.gz"})
    eval_split: str = field(metadata={"help": "split evaluated when none is given"})

    def __post_init__(self) -> None:
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"task {self.name}: labels must be distinct and non-empty, got {self.labels}")
        if self.eval_split not in self.splits:
            raise ConfigError(f"task {self.name}: eval_split {self.eval_split!r} is not one of {self.splits}")
        re.compile(self.pattern)

    def extract(self, text: str) -> str | None:
        """Return the first match of the task's regex in ``text`` (stripped), or None if nothing matches."""
        match = re.search(self.pattern, text.strip())
        return match.group(0) if match else None


def _numbered(stem: str, n: int) -> tuple[str, ...]:
    return tuple(f"{stem}{i}" for i in range(1, n + 1))


# The regexes are copied from LLM-Adapters' extract_answer(); note that social_i_qa and openbookqa
# share ARC's `answer1..answer5` regex, so a generated `answer5` there is extracted and counted wrong.
_ANSWER_REGEX = r"answer1|answer2|answer3|answer4|answer5"

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("boolq", ("true", "false"), r"true|false", None, ("train", "test"), "test"),
        Task("piqa", _numbered("solution", 2), r"solution1|solution2", "Solution", ("test",), "test"),
        Task("social_i_qa", _numbered("answer", 3), _ANSWER_REGEX, "Answer", ("sample",), "sample"),
        Task("ARC-Challenge", _numbered("answer", 5), _ANSWER_REGEX, "Answer", ("train", "test"), "test"),
        Task("ARC-Easy", _numbered("answer", 5), _ANSWER_REGEX, "Answer", ("train", "test"), "test"),
        Task("openbookqa", _numbered("answer", 4), _ANSWER_REGEX, "Answer", ("train", "test"), "test"),
        Task(
            "hellaswag",
            _numbered("ending", 4),
            r"ending1|ending2|ending3|ending4",
            "Ending",
            ("test",),
            "test",
        ),
        Task("winogrande", _numbered("option", 2), r"option1|option2", "Option", ("sample",), "sample"),
    )
}

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
