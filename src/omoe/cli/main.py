"""``omoe`` command line: one sub-command per module in :mod:`omoe.cli`.

Every sub-command module exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed ``argparse.Namespace``. Every failure prints one line
(argparse's own errors too: :func:`build_parser` sets each sub-command's ``parser.error``),
``omoe <command>: error: ...``, and exits with :func:`exit_code`'s status: 2 for bad input (usage:
:class:`OMoEError`, missing files), 1 for a run that failed on valid input (:class:`RunError`, such
as a NaN loss, or a write that failed: a full disk), 130 after Ctrl-C. ``--debug`` shows the
traceback instead. docs/reliability.md lists what each kind of bad input prints.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from omoe.errors import OMoEError, RunError

SUBCOMMANDS = ("quickstart", "train", "eval", "bench", "params", "experiment", "report", "analyze", "generate")


USAGE, RUNTIME, INTERRUPTED = 2, 1, 130
# OSErrors that mean a path the user gave is wrong (usage), not that the run failed on the way.
_USAGE_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def exit_code(err: BaseException) -> int | None:
    """The exit status of a failure the CLI reports in one line; None for a bug (a traceback)."""
    if isinstance(err, RunError):
        return RUNTIME
    if isinstance(err, (OMoEError, *_USAGE_OS_ERRORS)):
        return USAGE
    if isinstance(err, OSError):  # a write failed: a full disk, an I/O error
        return RUNTIME
    if isinstance(err, KeyboardInterrupt):
        return INTERRUPTED
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omoe", description="Orthogonal Mixture of LoRA Experts.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"omoe.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"omoe.cli.{name}":
                continue  # sub-command not built yet
            raise
        module.register(subparsers)
    for name, sub in subparsers.choices.items():
        sub.error = _one_line_error(sub, f"omoe {name}")
    return parser


def _one_line_error(parser: argparse.ArgumentParser, prog: str):
    """argparse's ``error`` without the usage lines it prints first: ``prog: error: message``."""

    def error(message: str):
        parser.exit(USAGE, f"{prog}: error: {message}\n")

    return error


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the sub-command
    parser = build_parser()
    args = parser.parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    if args.command is None:
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (OMoEError, OSError, KeyboardInterrupt) as err:
        code = exit_code(err)
        if args.debug:
            raise
        if code == INTERRUPTED:
            print(f"omoe {args.command}: interrupted", file=sys.stderr)
        else:
            print(f"omoe {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return code
    return int(result or 0)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
