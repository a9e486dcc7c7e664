"""The ``kvaware`` command line: one subcommand per feature, each defined next to its feature.

Each entry of `_COMMANDS` is a module exposing ``register(subparsers) -> None``; the subparser
it adds sets ``func(args) -> int``, and ``extras`` (names of `kvaware_scorer.extras`) when the
command needs optional dependencies: a missing one is reported in one line before the command
runs. The modules are imported here, so the dependency graph shows every command; none of them
imports an extra's package at import time (they do so inside ``func``), which keeps the CLI
working on a base install.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from kvaware_scorer import __version__
from kvaware_scorer.epp import cli as epp_cli
from kvaware_scorer.events import cli as events_cli
from kvaware_scorer.extras import missing_extras, missing_extras_message
from kvaware_scorer.gateway import serve
from kvaware_scorer.scheduler import validate
from kvaware_scorer.sim import cli as sim_cli
from kvaware_scorer.tours import demo, quickstart

__all__ = ["HelpFormatter", "build_parser", "main"]

#: The subcommand modules, in the order ``kvaware --help`` lists them.
_COMMANDS: tuple[ModuleType, ...] = (
    quickstart,
    validate,
    sim_cli,
    serve,
    epp_cli,
    events_cli,
    demo,
)

#: Set (unless already set) before any command imports transformers: its import-time advice
#: ("PyTorch was not found ...") is noise for a router that only tokenizes.
_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; each option's help ends with its default unless it says one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text.lower()
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Every (sub)parser of the CLI formats its help with `HelpFormatter`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = _Parser(
        prog="kvaware", description="KV-cache-aware scoring and routing for vLLM fleets."
    )
    parser.add_argument("--version", action="version", version=f"kvaware {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in _COMMANDS:
        module.register(sub)
    return parser


def _command_name(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    words = [parser.prog, args.command]
    sub = getattr(args, "sim_command", None)
    return " ".join(w for w in [*words, sub] if w)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvaware`` console script."""
    for name, value in _QUIET_ENV.items():
        os.environ.setdefault(name, value)
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    missing = missing_extras(getattr(args, "extras", ()))
    if missing:
        print(missing_extras_message(_command_name(parser, args), missing), file=sys.stderr)
        return 1
    try:
        rc: int = func(args)
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
