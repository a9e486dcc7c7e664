"""``kvaware validate CONFIG``: check an EndpointPickerConfig and print what it resolves to.

Prints the resolved profile(s) (filters, scorers with weights, picker) and every plugin with
all its parameters, defaults included, plus warnings; or every error with its YAML path, and
exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.resources import resolve_config

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    """Add the ``validate`` subcommand."""
    p = sub.add_parser(
        "validate",
        help="validate an EndpointPickerConfig YAML and print the resolved profiles",
    )
    p.add_argument(
        "config", type=Path, help="EndpointPickerConfig YAML file, or a shipped config's name"
    )
    p.add_argument(
        "--resolved-yaml",
        action="store_true",
        help="print the resolved configuration as YAML (loads back unchanged)",
    )
    p.add_argument(
        "--block",
        action="append",
        default=[],
        metavar="PLUGIN",
        help="do not load this plugin (entry-point name); repeatable",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate `args.config`; returns 0 when valid, 1 otherwise."""
    from kvaware_scorer.scheduler.config import ConfigErrorGroup, load_config
    from kvaware_scorer.scheduler.manager import Hooks, make_plugin_manager
    from kvaware_scorer.scheduler.registry import PluginRegistry

    try:
        hooks = Hooks(make_plugin_manager(block=args.block))
        registry = PluginRegistry()
        hooks.register_plugins(registry)
        config = load_config(resolve_config(args.config), registry)
        hooks.config_resolved(config)
    except ConfigError as exc:
        errors = exc.errors if isinstance(exc, ConfigErrorGroup) else [exc]
        print(f"{args.config}: {len(errors)} error(s)", file=sys.stderr)
        for err in errors:
            print(f"  error: {err}", file=sys.stderr)
        return 1
    if args.resolved_yaml:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    else:
        print(config.describe())
    return 0
