"""The ``kvaware`` command line: one subcommand per feature, each defined next to its feature.

Each entry of `_COMMANDS` names a module exposing ``register(subparsers) -> None``; the
subparser it adds sets ``func(args) -> int``. Modules are imported only when the CLI starts.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]

_COMMANDS: tuple[str, ...] = (
    "kvaware_scorer.quickstart",
    "kvaware_scorer.scheduler.validate",
    "kvaware_scorer.sim.cli",
    "kvaware_scorer.gateway.serve",
    "kvaware_scorer.epp.cli",
    "kvaware_scorer.events.cli",
    "kvaware_scorer.demo",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="kvaware", description="KV-cache-aware scoring and routing for vLLM fleets."
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvaware`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        rc: int = func(args)
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
