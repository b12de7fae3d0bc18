"""Evaluation on the commonsense tasks with three protocols whose numbers are not comparable.

- ``generate``: LLM-Adapters (greedy generation + first regex match), on the alpaca prompt;
- ``label``: next-token logits of the task's label tokens (MoE-PEFT / MixLoRA); with the moe-peft
  prompt format, the protocol of the OMoE paper's numbers;
- ``loglik``: summed log-likelihood of each choice text (lm-eval), with ``acc`` and ``acc_norm``.

See ``docs/evaluation.md``.
"""

from omoe.eval.evaluate import PROTOCOLS, evaluate, get_protocol
from omoe.eval.generate import GenerateProtocol
from omoe.eval.label import LabelProtocol, label_tokens
from omoe.eval.loglik import LoglikProtocol, continuation_logprobs, parse_choices
from omoe.eval.report import markdown_table, predictions_path, write_results

__all__ = [
    "PROTOCOLS",
    "GenerateProtocol",
    "LabelProtocol",
    "LoglikProtocol",
    "continuation_logprobs",
    "evaluate",
    "get_protocol",
    "label_tokens",
    "markdown_table",
    "parse_choices",
    "predictions_path",
    "write_results",
]
