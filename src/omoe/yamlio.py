"""YAML text of the dataclass configs: read a file's mapping, write a config with each field's help
text as the comment above it (litgpt style), and show one value as YAML writes it.

The help text lives on the fields (``metadata={"help": ...}``) and in a section class's docstring;
:mod:`omoe.options` turns the same text into ``--help``, so the YAML comments and the flags cannot
drift apart.
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import yaml

from omoe.errors import ConfigError


def section_doc(cls) -> str:
    """The first paragraph of a section class's docstring, on one line."""
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in doc.splitlines())


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def show(value) -> str:
    """``value`` as one YAML flow scalar or list (``0.001``, ``[a, b]``, ``null``), without the
    document-end marker PyYAML adds after a plain scalar."""
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; missing, unreadable or malformed files raise one-line errors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"config {path} is a directory; give a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())  # one line
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values, got a {type(data).__name__}")
    return data


def to_yaml(obj, header: str | None = None) -> str:
    """The config as YAML, each key preceded by its help text as a comment (litgpt style)."""
    lines = [f"# {h}" if h else "#" for h in header.splitlines()] if header else []
    _yaml_lines(obj, 0, lines)
    return "\n".join(lines) + "\n"


def _yaml_lines(obj, indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            if lines and indent == 0:
                lines.append("")
            for h in _wrap(section_doc(type(value)), 100 - len(pad)):
                lines.append(f"{pad}# {h}")
            lines.append(f"{pad}{f.name}:")
            _yaml_lines(value, indent + 1, lines)
            continue
        for h in _wrap(field_help(f), 100 - len(pad)):
            lines.append(f"{pad}# {h}")
        lines.append(f"{pad}{f.name}: {show(value)}")


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width=max(width, 40)) if text else []
