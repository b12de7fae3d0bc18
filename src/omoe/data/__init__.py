"""Commonsense benchmark data: task registry, file loading, prompt formats and tokenisation."""

from omoe.data.fields import Fields, parse_choices, parse_fields
from omoe.data.loader import DataFormatError, bundled_file, load_records, load_split, load_task, mix_tasks
from omoe.data.prompts import PROMPT_FORMATS, PROMPT_NO_INPUT, PROMPT_WITH_INPUT, build_prompt, render
from omoe.data.tasks import ANSWER_TEMPLATE, TASK_NAMES, TASKS, Task, get_task, parse_task_list, val_indices
from omoe.data.tokenize import IGNORE_INDEX, TokenizedData, collate, tokenize_dataset, tokenize_example

__all__ = [
    "ANSWER_TEMPLATE",
    "IGNORE_INDEX",
    "PROMPT_FORMATS",
    "PROMPT_NO_INPUT",
    "PROMPT_WITH_INPUT",
    "TASKS",
    "TASK_NAMES",
    "DataFormatError",
    "Fields",
    "Task",
    "TokenizedData",
    "build_prompt",
    "bundled_file",
    "collate",
    "get_task",
    "load_records",
    "load_split",
    "load_task",
    "mix_tasks",
    "parse_choices",
    "parse_fields",
    "parse_task_list",
    "render",
    "tokenize_dataset",
    "tokenize_example",
    "val_indices",
]
