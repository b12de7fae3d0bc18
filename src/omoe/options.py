"""Dataclass configs <-> YAML files <-> ``--section.key value`` flags (the litgpt pattern).

A config is a dataclass whose fields carry ``metadata={"help": ...}`` and whose ``__post_init__``
checks ranges. Nested dataclass fields are sections; a leaf is addressed by its dotted key
(``optim.lr``). The same help text becomes the ``--help`` of the command and the comments of the
YAML written by :func:`omoe.yamlio.to_yaml`, so the two cannot drift apart.

Values are coerced to the annotated type with messages that name the key; unknown keys raise a
:class:`~omoe.errors.ConfigError` that lists the valid ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

import yaml

from omoe.errors import ConfigError
from omoe.yamlio import field_help, read_yaml, section_doc, show
from omoe.yamlio import to_yaml as to_yaml  # options.to_yaml, as before yamlio held it

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"null", "none", "~", ""}


# ---------------------------------------------------------------------------- introspection
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def leaves(cls, prefix: str = "") -> list[tuple[str, dataclasses.Field, object]]:
    """``(dotted key, field, type)`` of every leaf field of ``cls``, sections flattened in order."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if _is_section(tp):
            out.extend(leaves(tp, f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", f, tp))
    return out


def valid_keys(cls) -> list[str]:
    return [key for key, _, _ in leaves(cls)]


def type_name(tp) -> str:
    """Human words for an annotation: 'an integer or null', 'a list of strings'."""
    args = typing.get_args(tp)
    if _is_union(tp):
        parts = [type_name(a) for a in args if a is not type(None)]
        if type(None) in args:
            parts.append("null")
        return " or ".join(parts)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return f"a list of {_plural(type_name(args[0]) if args else 'values')}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _plural(words: str) -> str:
    return {"an integer": "integers", "a number": "numbers", "a string": "strings"}.get(words, words)


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


# ---------------------------------------------------------------------------- ranges
def check_int(key: str, value, low: int, *, nullable: bool = False) -> None:
    """Refuse ``value`` unless it is an integer >= ``low`` (or None where ``nullable``): the one
    range check of every config and command, with one wording."""
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key} must be an integer >= {low}{' or null' if nullable else ''}, got {value!r}")


# ---------------------------------------------------------------------------- coercion
def coerce(value, tp, key: str):
    """Return ``value`` as type ``tp`` or raise a ConfigError naming ``key`` and the expected type."""
    try:
        return _coerce(value, tp)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be {type_name(tp)}, got {value!r}") from None


def _coerce(value, tp):
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            if type(None) in args:
                return None
            if value is None:
                raise ValueError
            # not nullable: 'none' is an ordinary string here (e.g. orthogonal_layers: none)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except (TypeError, ValueError):
                pass
        raise ValueError
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item,) = typing.get_args(tp) or (object,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [_coerce(v, item) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise TypeError
    if tp is int:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            return int(value.strip())
        raise TypeError
    if tp is float:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 2e-4 (no dot) as a string
            return float(value.strip())
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    return value


def parse_cli_value(text: str, tp):
    """A command-line string as YAML reads it, except that string-typed keys keep the raw text."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if value is None or isinstance(value, (list, dict)):
        return value
    accepts_str = tp is str or (_is_union(tp) and str in typing.get_args(tp))
    return text if accepts_str else value


# ---------------------------------------------------------------------------- building
def build(cls, data: dict | None, prefix: str = ""):
    """Instantiate ``cls`` from a nested dict (YAML); missing keys keep their defaults.

    Raises:
        ConfigError: unknown key (listing the valid ones), wrong type, or a value rejected by a
            ``__post_init__`` check.
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"{where} must be a mapping of keys to values, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        bad = ", ".join(_shown(f"{prefix}{k}") for k in unknown)
        raise ConfigError(f"unknown config key(s) {bad}; valid keys: {', '.join(valid_keys_of(cls, prefix))}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        if _is_section(tp):
            kwargs[name] = build(tp, data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(data[name], tp, f"{prefix}{name}")
    return cls(**kwargs)


def _shown(key: str) -> str:
    """A key as typed, or quoted where it holds blanks or unprintable characters (``'\\n'``)."""
    return key if key.isprintable() and key.strip() == key and " " not in key else repr(key)


def valid_keys_of(cls, prefix: str = "") -> list[str]:
    return [f"{prefix}{k}" for k in valid_keys(cls)]


def set_dotted(data: dict, cls, key: str, value) -> None:
    """Put ``value`` at dotted ``key`` of the nested dict ``data`` (an override)."""
    types_by_key = {k: tp for k, _, tp in leaves(cls)}
    if key not in types_by_key:
        raise ConfigError(f"unknown config key {_shown(key)}; valid keys: {', '.join(types_by_key)}")
    *sections, leaf = key.split(".")
    node = data
    for s in sections:
        child = node.get(s)
        if child is None:
            child = node[s] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{s} must be a mapping of keys to values, got {child!r}")
        node = child
    node[leaf] = value


def key_type(cls, key: str):
    return {k: tp for k, _, tp in leaves(cls)}[key]


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


# ---------------------------------------------------------------------------- argparse
def add_arguments(
    parser: argparse.ArgumentParser,
    cls,
    aliases: dict[str, str] | None = None,
    negations: dict[str, str] | None = None,
) -> None:
    """One ``--key`` flag per leaf of ``cls`` (grouped by section), help = the field's help text.

    A key with underscores is also ``--the-key``; a true/false key given alone means true;
    ``aliases`` maps more flag names to keys, ``negations`` maps ``no-...`` flags to the boolean key
    they set to false. A list key whose field says ``metadata={"repeat": True}`` takes one item per
    flag (``--adapter A --adapter B``); other lists are comma-separated. Values are kept as strings
    (``default=SUPPRESS``) and parsed by :func:`overrides_from_args`, so a flag that is not given
    does not override the YAML.
    """
    aliases = aliases or {}
    reverse: dict[str, list[str]] = {}
    for flag, key in aliases.items():
        reverse.setdefault(key, []).append(flag)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, f, tp in leaves(cls):
        section = key.rpartition(".")[0]
        if section not in groups:
            title = f"{section} options" if section else "config keys"
            doc = section_doc(_section_class(cls, section)) if section else None
            groups[section] = parser.add_argument_group(title, doc)
        default = _default(cls, key)
        shown = "required" if default is dataclasses.MISSING else f"default: {show(default)}"
        help_text = f"{field_help(f)} ({type_name(tp)}; {shown})".replace("%", "%%")
        flags = [f"--{key}"] + [f"--{a}" for a in reverse.get(key, [])]
        if "_" in key and f"--{key.replace('_', '-')}" not in flags:
            flags.append(f"--{key.replace('_', '-')}")
        kind: dict = {"metavar": _metavar(tp)}
        if tp is bool:
            kind.update(nargs="?", const="true")
        elif f.metadata.get("repeat"):
            kind.update(action="append")
        groups[section].add_argument(*flags, dest=key, default=argparse.SUPPRESS, help=help_text, **kind)
    for flag, key in (negations or {}).items():
        parser.add_argument(
            f"--{flag}", dest=key, action="store_const", const="false", default=argparse.SUPPRESS,
            help=f"the same as --{key} false",
        )  # fmt: skip


def add_config_arguments(parser: argparse.ArgumentParser, cls, aliases=None, negations=None) -> None:
    """``--config FILE.yaml`` plus one flag per key of ``cls`` (:func:`add_arguments`), unknown flags
    refused in one line: a command built from a dataclass, as ``omoe train`` is."""
    parser.add_argument(
        "--config", metavar="FILE.yaml", help="YAML file of these keys; flags given override it"
    )
    add_arguments(parser, cls, aliases, negations)
    one_line_errors(parser, parser.prog, cls)


def config_data(args: argparse.Namespace, cls) -> dict:
    """The nested dict of ``--config`` (or empty) with the flags given on top."""
    data = read_yaml(args.config) if getattr(args, "config", None) else {}
    for key, value in overrides_from_args(args, cls).items():
        set_dotted(data, cls, key, value)
    return data


def _section_class(cls, section: str):
    for part in section.split("."):
        cls = _hints(cls)[part]
    return cls


def _default(cls, key: str):
    """The field default of dotted ``key`` (``dataclasses.MISSING`` for a required key), read from
    the fields: building ``cls()`` could fail its own checks."""
    *sections, leaf = key.split(".")
    for part in sections:
        cls = _hints(cls)[part]
    f = next(f for f in dataclasses.fields(cls) if f.name == leaf)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _get_dotted(obj, key: str):
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _metavar(tp) -> str:
    if _is_union(tp):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return "A,B,..."
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}.get(tp, "VALUE")


def overrides_from_args(args: argparse.Namespace, cls) -> dict[str, object]:
    """``{dotted key: parsed value}`` for the leaf flags given on the command line."""
    given = vars(args)
    out = {}
    for key, _, tp in leaves(cls):
        if key in given:
            value = given[key]
            # A repeatable flag: one item per flag, kept whole (a path may hold a comma).
            out[key] = value if isinstance(value, list) else parse_cli_value(value, tp)
    return out


def one_line_errors(parser: argparse.ArgumentParser, prog: str, cls) -> None:
    """Refuse unknown flags in one line that lists the valid keys of ``cls`` (``prog``: kept for
    callers; the one-line ``parser.error`` itself is set for every command by ``omoe.cli.main``)."""
    original = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extras = original(args, namespace)
        if extras:
            flags = [e for e in extras if e.startswith("-")] or extras
            parser.error(
                f"unknown option(s) {' '.join(flags)}; valid keys: "
                + ", ".join(f"--{k}" for k in valid_keys(cls))
            )
        return ns, extras

    parser.parse_known_args = parse_known_args
