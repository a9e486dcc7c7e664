"""Files shipped with kvaware: scheduler configs, the bundled trace and the built-in tokenizer.

Commands find them here, never relative to the working directory. In a wheel they live under
``kvaware_scorer/data/``; in a source checkout (an editable install) the configs and the trace
are read from the repository's ``config/`` and ``benchmarks/traces/`` folders, which the wheel
build copies to ``data/config/`` and ``data/traces/`` (``pyproject.toml``). Every ``*.yaml`` in
the config folder whose ``kind`` is ``EndpointPickerConfig`` is a shipped scheduler config,
named by its file name without ``.yaml``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

__all__ = [
    "BUILTIN_TOKENIZER_MODEL",
    "builtin_tokenizer",
    "builtin_tokenizers_dir",
    "config_dir",
    "default_trace",
    "resolve_config",
    "shipped_configs",
]

_PACKAGE = Path(__file__).resolve().parent
_DATA = _PACKAGE / "data"

#: The model name of the built-in tokenizer (a byte-level BPE with a ChatML template built by
#: `kvaware_scorer.tokenization.build_tokenizer` with its defaults). ``kvaware sim serve`` serves
#: this model by default, and every tokenizer registry knows it, so the emulated pods and a
#: gateway tokenize alike with no configuration.
BUILTIN_TOKENIZER_MODEL = "kvaware/sim"

_TRACE_NAME = "mooncake_synthetic_trace.jsonl"


def _packaged_or_source(packaged: Path, source: Path) -> Path:
    return packaged if packaged.is_dir() else source


def config_dir() -> Path:
    """The folder of the shipped configs (``data/config`` in a wheel, ``config/`` in a checkout)."""
    return _packaged_or_source(_DATA / "config", _PACKAGE.parent / "config")


def _is_scheduler_config(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("kind") == "EndpointPickerConfig"


def shipped_configs() -> dict[str, Path]:
    """Shipped scheduler configs by name (``precise`` -> ``.../precise.yaml``), sorted by name."""
    folder = config_dir()
    found = sorted(folder.glob("*.yaml")) if folder.is_dir() else []
    return {p.stem: p for p in found if _is_scheduler_config(p)}


def resolve_config(name: str | Path) -> Path:
    """The config file a command argument names, wherever the command runs.

    An existing file is itself. Otherwise a bare name (``precise``, ``precise.yaml``) or a
    path into a ``config/`` folder (``config/precise.yaml``, as the README writes it) names the
    shipped config of that name. Anything else is returned as given, for the caller to report.

    Args:
        name: What the user wrote.

    Returns:
        The path to read.
    """
    path = Path(name)
    if path.is_file():
        return path
    if len(path.parts) == 1 or (len(path.parts) == 2 and path.parts[0] == "config"):
        stem = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
        shipped = config_dir() / f"{stem}.yaml"
        if shipped.is_file():
            return shipped
    return path


def default_trace() -> Path:
    """The bundled Mooncake-format trace (``--workload trace`` without ``--trace``)."""
    folder = _packaged_or_source(_DATA / "traces", _PACKAGE.parent / "benchmarks" / "traces")
    return folder / _TRACE_NAME


def builtin_tokenizers_dir() -> Path:
    """The discovery root of the built-in tokenizers (``<org>/<name>/tokenizer.json`` layout)."""
    return _DATA / "tokenizers"


def builtin_tokenizer() -> Path:
    """The directory of the built-in tokenizer (model `BUILTIN_TOKENIZER_MODEL`)."""
    return builtin_tokenizers_dir().joinpath(*BUILTIN_TOKENIZER_MODEL.split("/"))
