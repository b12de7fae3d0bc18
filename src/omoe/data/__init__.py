"""Commonsense benchmark data: task registry, file loading, the Alpaca prompt and tokenisation."""

from omoe.data.loader import DataFormatError, bundled_file, load_records, load_task, mix_tasks
from omoe.data.prompts import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, build_prompt
from omoe.data.tasks import ANSWER_TEMPLATE, TASK_NAMES, TASKS, Task, get_task, parse_task_list
from omoe.data.tokenize import IGNORE_INDEX, TokenizedData, collate, tokenize_dataset, tokenize_example

__all__ = [
    "ANSWER_TEMPLATE",
    "IGNORE_INDEX",
    "PROMPT_NO_INPUT",
    "PROMPT_WITH_INPUT",
    "TASKS",
    "TASK_NAMES",
    "DataFormatError",
    "Task",
    "TokenizedData",
    "build_prompt",
    "bundled_file",
    "collate",
    "get_task",
    "load_records",
    "load_task",
    "mix_tasks",
    "parse_task_list",
    "tokenize_dataset",
    "tokenize_example",
]
