"""The install extras (``pyproject.toml``'s optional dependencies) and the one-line message a
command prints when one it needs is missing.

`EXTRAS` maps each extra to the modules it provides; a test checks it against
``pyproject.toml``, so the two never drift apart.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

__all__ = ["DISTRIBUTIONS", "EXTRAS", "missing_extras", "missing_extras_message"]

#: Extra name -> modules it installs (import names), as ``pyproject.toml`` declares them.
EXTRAS: dict[str, tuple[str, ...]] = {
    "tokenizers": ("transformers", "tokenizers", "jinja2"),
    "redis": ("redis",),
    "gateway": ("aiohttp",),
    "plot": ("matplotlib",),
    "fast": ("uvloop",),
    "epp": ("grpc", "grpc_health", "envoy", "kubernetes", "cryptography"),
}

#: Import name -> distribution, where they differ (the rest are the same name).
DISTRIBUTIONS: dict[str, str] = {
    "grpc": "grpcio",
    "grpc_health": "grpcio-health-checking",
    "envoy": "xds-protos",
}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked parent package
        return False


def missing_extras(extras: Iterable[str]) -> list[str]:
    """The extras among `extras` (names of `EXTRAS`) with a module that cannot be imported."""
    return [e for e in extras if not all(_importable(m) for m in EXTRAS[e])]


def missing_extras_message(what: str, missing: Iterable[str]) -> str:
    """``<what> needs the 'x' extra: pip install 'kvaware-scorer[x]'`` (one line).

    Args:
        what: The command or feature, e.g. ``kvaware sim serve``.
        missing: Extra names, at least one.
    """
    names = list(missing)
    quoted = [f"'{n}'" for n in names]
    listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
    noun = "extra" if len(names) == 1 else "extras"
    return f"{what} needs the {listed} {noun}: pip install 'kvaware-scorer[{','.join(names)}]'"
