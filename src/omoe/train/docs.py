"""The field table of docs/training.md, generated from the dataclasses: ``python -m omoe.train.docs``."""

from __future__ import annotations

from omoe import options
from omoe.train.config import TrainConfig


def fields_table(cls=TrainConfig) -> str:
    """Markdown table: every dotted key, its type, default and help text."""
    defaults = cls()
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, f, tp in options.leaves(cls):
        default = options.show(options._get_dotted(defaults, key))
        meaning = options.field_help(f).replace("|", "\\|")
        lines.append(f"| `{key}` | {options.type_name(tp)} | `{default}` | {meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(fields_table())
