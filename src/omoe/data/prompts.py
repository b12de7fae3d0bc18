"""Prompt formats: how a record becomes ``(prompt, target)`` for training and evaluation.

- ``alpaca``: the Alpaca template of LLM-Adapters around the record's instruction, target = the
  record's ``output`` (``the correct answer is answer2``), EOS after it in training.
- ``moe-peft``: the per-task wording of MoE-PEFT's ``moe_peft/tasks/qa_tasks.py`` (the format in
  which MixLoRA's numbers, and hence the OMoE paper's Table 1 LoRA row, were produced), target = one
  label word with its leading space (`` A``, `` true``), no EOS. The question and choices are parsed
  from the LLM-Adapters instruction (:mod:`omoe.data.fields`), so one data set serves both formats.
  Choices are lettered A, B, C, ... by position (``answer2`` -> ``B``); boolq's labels are the words
  ``true`` / ``false``.

LLM-Adapters' ``finetune.py`` / ``commonsense_evaluate.py`` write the Alpaca templates as indented
triple-quoted f-strings, so their literal strings carry the source indentation (and, depending on
the commit, a trailing space or a stray ``# noqa: E501``). We use the clean Alpaca text, identical for
training and evaluation; ``docs/data.md`` records the difference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from omoe.data.fields import parse_fields
from omoe.data.loader import DataFormatError
from omoe.data.tasks import ANSWER_TEMPLATE, Task, get_task
from omoe.errors import ConfigError

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


# ---------------------------------------------------------------------------- MoE-PEFT's wording
LETTERS = "ABCDE"


def _as_is(question: str) -> str:
    return question


@dataclass(frozen=True)
class MoEPEFTTemplate:
    """One task's prompt in MoE-PEFT: ``header + question(q) + choice per choice + footer``."""

    header: str
    choice: str  # filled with letter and text for each choice; "" for boolq (no choices shown)
    footer: str
    question: Callable[[str], str] = _as_is  # LLM-Adapters' question -> MoE-PEFT's

    def prompt(self, question: str, letters: list[str], texts: list[str]) -> str:
        choices = "".join(self.choice.format(letter=a, text=t) for a, t in zip(letters, texts))
        return self.header + self.question(question) + choices + self.footer


_ARC = MoEPEFTTemplate(
    "Please choose the correct answer to the question: ", " ({letter}) {text}", "\nAnswer:"
)
_LISTED = "\n({letter}) {text}"
_SENTENCE = "\nSentence: "

MOE_PEFT_TEMPLATES: dict[str, MoEPEFTTemplate] = {
    "ARC-Challenge": _ARC,
    "ARC-Easy": _ARC,
    "openbookqa": _ARC,
    # LLM-Adapters' question already ends in "?"; MoE-PEFT appends one to the raw BoolQ question.
    "boolq": MoEPEFTTemplate("Please answer the following question with true or false: ", "", "?\nAnswer:",
                             lambda q: q.removesuffix("?")),
    "piqa": MoEPEFTTemplate(
        "Below is a common task along with two possible solutions labeled (A) and (B). Please select the "
        "appropriate solution to achieve the task:\n", _LISTED, "\n\nCorrect solution:", lambda q: q + "\n"),
    # LLM-Adapters joined SIQA's context and question with a space, as MoE-PEFT does.
    "social_i_qa": MoEPEFTTemplate("Please choose the correct answer to the question.\nQuestion: ", _LISTED,
                                   "\nAnswer:"),
    # LLM-Adapters writes "<activity label>: <context>", MoE-PEFT "<activity label>. <context>".
    "hellaswag": MoEPEFTTemplate("Please choose the correct ending to complete the given sentence." + _SENTENCE,
                                 _LISTED, "\nAnswer:", lambda q: q.replace(": ", ". ", 1)),
    "winogrande": MoEPEFTTemplate(
        "Please choose the correct answer to fill in the blank to complete the given sentence." + _SENTENCE,
        _LISTED, "\nAnswer:"),
}  # fmt: skip


# ---------------------------------------------------------------------------- formats
class AlpacaFormat:
    """LLM-Adapters: the Alpaca template, target ``the correct answer is <label>`` + EOS."""

    name = "alpaca"
    train_eos = True  # training appends EOS after the target
    label_options: ClassVar[dict] = {"answer_template": ANSWER_TEMPLATE}  # what the label protocol records

    def label_names(self, task: Task) -> tuple[str, ...]:
        return task.labels

    def responses(self, task: Task) -> tuple[str, ...]:
        """The response that names each label, aligned with ``task.labels``."""
        return tuple(ANSWER_TEMPLATE.format(label=label) for label in task.labels)

    def render(self, record: dict, task: Task | None) -> tuple[str, str]:
        return build_prompt(record, with_output=False), record["output"]


class MoEPEFTFormat:
    """MoE-PEFT: its per-task wording, target `` <letter>`` (or `` true`` / `` false``), no EOS."""

    name = "moe-peft"
    # MoE-PEFT trains on prompt + " " + label without EOS; the label protocol scores the label only.
    train_eos = False
    label_options: ClassVar[dict] = {
        "response": "' <label>' (A, B, ... by choice position; boolq: true/false) after the prompt"
    }

    def label_names(self, task: Task) -> tuple[str, ...]:
        return task.labels if task.choice_marker is None else tuple(LETTERS[: len(task.labels)])

    def responses(self, task: Task) -> tuple[str, ...]:
        return tuple(" " + name for name in self.label_names(task))

    def render(self, record: dict, task: Task | None) -> tuple[str, str]:
        if task is None:
            raise ConfigError(
                f"prompt {self.name} needs each record's task: pass task= or records of mix_tasks"
            )
        fields = parse_fields(task, record["instruction"])
        if record["answer"] not in fields.labels:
            raise DataFormatError(
                f"answer {record['answer']!r} is not among the listed choices {fields.labels}"
            )
        names = dict(zip(task.labels, self.label_names(task)))
        prompt = MOE_PEFT_TEMPLATES[task.name].prompt(
            fields.question, [names[label] for label in fields.labels], fields.texts
        )
        return prompt, " " + names[record["answer"]]


FORMATS = {f.name: f for f in (AlpacaFormat(), MoEPEFTFormat())}
PROMPT_FORMATS: tuple[str, ...] = tuple(FORMATS)


def get_format(name: str):
    """The format object of a prompt format name; unknown names are a one-line ConfigError."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown prompt format {name!r}; allowed: {', '.join(PROMPT_FORMATS)}") from None


def render(record: dict, task: str | Task, fmt: str) -> tuple[str, str]:
    """``(prompt, target)`` of one record: the text the model reads and the text it is trained to
    continue with. ``alpaca``: ``(build_prompt(record, with_output=False), record["output"])``;
    ``moe-peft``: MoE-PEFT's wording and the label with its leading space (``" B"`` for ``answer2``)."""
    return get_format(fmt).render(record, get_task(task))


def render_many(records: list[dict], task: str | Task | None, fmt: str) -> tuple[list[str], list[str]]:
    """Prompts and targets of many records; a record's own ``"task"`` key (mixtures) wins over
    ``task``. Errors name the task and the record's index."""
    form = get_format(fmt)
    prompts, targets = [], []
    for i, record in enumerate(records):
        name = record.get("task", task)
        t = get_task(name) if name is not None else None
        try:
            prompt, target = form.render(record, t)
        except DataFormatError as err:
            raise DataFormatError(f"{t.name} record {i}: {err}") from None
        prompts.append(prompt)
        targets.append(target)
    return prompts, targets
