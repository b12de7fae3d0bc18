"""The fields of an LLM-Adapters record, parsed back out of its instruction.

An instruction reads ``<task prefix><question>\\n\\n<Marker1>: <text> <Marker2>: <text> ...\\n\\nAnswer
format: label1/label2/...`` (boolq: no choices, its labels are the words ``true`` / ``false``). The
``loglik`` protocol scores the choice texts; the ``moe-peft`` prompt format re-words the question and
the choices (:mod:`omoe.data.prompts`). One data set thus serves every format.
"""

from __future__ import annotations

from dataclasses import dataclass

from omoe.data.loader import DataFormatError
from omoe.data.tasks import Task

FORMAT_MARKER = "Answer format:"


@dataclass(frozen=True)
class Fields:
    """What an instruction says: the question and its choices."""

    question: str  # the text between the task's instruction prefix and the first choice
    labels: list[str]  # the choices' labels as the ``Answer format:`` line lists them, e.g. answer1..answer4
    texts: list[str]  # each choice's text, aligned with ``labels`` (boolq: the labels themselves)


def parse_choices(task: Task, instruction: str) -> tuple[list[str], list[str]]:
    """``(labels, texts)``: the instruction's choices, aligned.

    The labels come from the last ``Answer format: a/b/c`` line; the text of choice ``labelN`` runs
    from its marker (``LabelN:``) to the next marker, or to ``Answer format:`` for the last one.
    Markers are searched backwards from the format line, so a question mentioning ``Answer1:`` does not
    confuse it.

    Raises:
        DataFormatError: no format line, a label outside the task's, a missing or empty choice (one
            line, without the record index).
    """
    labels, texts, _ = _choices(task, instruction)
    return labels, texts


def parse_fields(task: Task, instruction: str) -> Fields:
    """Question and choices; the question is the text after ``task.instruction_prefix`` (which the
    instruction must start with) up to the first choice (boolq: up to ``Answer format:``)."""
    labels, texts, end = _choices(task, instruction)
    if not instruction.startswith(task.instruction_prefix):
        raise DataFormatError(
            f"the instruction does not start with {task.name}'s LLM-Adapters wording {task.instruction_prefix!r}"
        )
    question = instruction[len(task.instruction_prefix) : end].strip()
    if not question:
        raise DataFormatError("the question is empty")
    return Fields(question, labels, texts)


def _choices(task: Task, instruction: str) -> tuple[list[str], list[str], int]:
    """Labels, texts and where the first choice (or, for boolq, the format line) starts."""
    end = instruction.rfind(FORMAT_MARKER)
    if end < 0:
        raise DataFormatError(f"no {FORMAT_MARKER!r} line in the instruction")
    labels = [s.strip() for s in instruction[end + len(FORMAT_MARKER) :].strip().split("/")]
    unknown = [label for label in labels if label not in task.labels]
    if unknown:
        raise DataFormatError(
            f"{FORMAT_MARKER} lists {unknown}, not {task.name} labels ({'/'.join(task.labels)})"
        )
    if task.choice_marker is None:
        return labels, list(labels), end
    texts: list[str] = []
    for label in reversed(labels):
        marker = task.choice_marker + label[len(task.choice_marker) :] + ":"
        start = instruction.rfind(marker, 0, end)
        if start < 0:
            raise DataFormatError(f"choice marker {marker!r} not found in the instruction")
        text = instruction[start + len(marker) : end].strip()
        if not text:
            raise DataFormatError(f"choice {marker!r} is empty")
        texts.append(text)
        end = start
    return labels, texts[::-1], end
