"""Reading config files and reporting their errors, shared by every config surface.

The scheduler's EndpointPickerConfig, the gateway's `GatewayConfig`, the endpoints file and the
indexer's `IndexerConfig` all read YAML and report problems the same way:

* `load_yaml` / `read_yaml`: strict YAML (duplicate keys refused, nesting bounded by
  `MAX_YAML_DEPTH`, text must be UTF-8) with every problem a `ConfigError`, never a parser
  traceback; `load_yaml` also remembers the line of every key and list item.
* one error form, ``path: message (valid: ...)``, with the closest valid key suggested
  (``did you mean 'blockSize'?``) and the YAML line where the loader knows it; several errors are
  raised together as a `ConfigErrorGroup` that lists every one of them.
* `parse_duration`: seconds or Go-style durations (``"2s"``, ``"500ms"``).
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kvaware_scorer.errors import ConfigError, ConfigErrorGroup

__all__ = [
    "MAX_YAML_DEPTH",
    "YamlDocument",
    "closest",
    "config_error",
    "errors_of",
    "flag_interval",
    "join_path",
    "load_yaml",
    "parse_duration",
    "read_yaml",
    "unknown_key",
    "validation_errors",
]

#: Deepest nesting of mappings and lists a config file may have. Real configs use under 10
#: levels; the bound keeps a hostile file (thousands of ``[`` in a few KB) from exhausting the
#: parser's recursion.
MAX_YAML_DEPTH = 64


# -- durations -----------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ns|us|µs|ms|s|m|h)?\s*$")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number (seconds) or a Go-style duration string (``"2s"``, ``"500ms"``).

    Raises:
        ValueError: Not a non-negative number or duration.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if m is None:
            raise ValueError(f"not a duration: {value!r} (use seconds or e.g. '2s', '500ms')")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    else:
        raise ValueError(f"not a duration: {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration must be finite and >= 0, got {value!r}")
    return seconds


def flag_interval(value: str | None, flag: str) -> float | None:
    """A command-line interval in seconds (None when the flag was not given).

    Raises:
        ConfigError: Not a positive duration (the error names `flag`).
    """
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise ConfigError(str(exc), flag) from None
    if seconds <= 0:
        raise ConfigError("must be > 0", flag)
    return seconds


# -- error messages ------------------------------------------------------------------------------


def join_path(base: str | None, part: int | str) -> str:
    """``base`` extended by a key (``a.b``) or a list index (``a[2]``)."""
    if isinstance(part, int):
        return f"{base or ''}[{part}]"
    return f"{base}.{part}" if base else str(part)


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The valid choice `word` most likely misspells, or None when none is close.

    A match ignoring case, ``_`` and ``-`` wins (``speculativeTTl`` -> ``speculativeTTL``,
    ``block_size`` -> ``blockSize``); otherwise the closest by edit similarity.
    """
    options = [c for c in choices if c != word]

    def fold(s: str) -> str:
        return s.lower().replace("_", "").replace("-", "")

    folded = fold(word)
    for c in options:
        if fold(c) == folded:
            return c
    by_fold = {fold(c): c for c in options}
    hits = difflib.get_close_matches(folded, list(by_fold), n=1, cutoff=0.75)
    return by_fold[hits[0]] if hits else None


def unknown_key(key: Any, valid: Sequence[str]) -> str:
    """The message for an unknown `key`: ``unknown key; did you mean 'x'? (valid: ...)``."""
    guess = closest(str(key), valid) if isinstance(key, str) else None
    msg = "unknown key"
    if guess is not None:
        msg += f"; did you mean {guess!r}?"
    if valid:
        msg += f" (valid: {', '.join(valid)})"
    return msg


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return tp


def _model_at(model: Any, loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The model class validating the mapping at `loc` inside `model` (None when unknown)."""
    current = model
    for part in loc:
        current = _unwrap_optional(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            fields = current.model_fields
            found = fields.get(str(part)) or next(
                (f for f in fields.values() if f.alias == part), None
            )
            if found is None:
                return None
            current = found.annotation
        elif typing.get_origin(current) in (list, dict):
            args = typing.get_args(current)
            current = args[-1] if args else None
        else:
            return None
    current = _unwrap_optional(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _choices(expected: str) -> list[str]:
    """``"'a', 'b' or 'c'"`` (pydantic's literal_error context) -> ``["a", "b", "c"]``."""
    parts = re.split(r", | or ", expected)
    return [p.strip().strip("'\"") for p in parts if p.strip()]


def _message(err: Any, model: type[BaseModel] | None) -> str:
    kind = err["type"]
    loc = err["loc"]
    if kind == "extra_forbidden":
        owner = _model_at(model, loc[:-1]) if model is not None else None
        valid = [f.alias or n for n, f in owner.model_fields.items()] if owner is not None else []
        return unknown_key(loc[-1] if loc else "", valid)
    if kind == "literal_error":
        valid = _choices(str(err.get("ctx", {}).get("expected", "")))
        given = err.get("input")
        guess = closest(given, valid) if isinstance(given, str) else None
        hint = f"; did you mean {guess!r}?" if guess else ""
        return f"{given!r} is not a valid choice{hint} (valid: {', '.join(valid)})"
    if kind == "missing":
        return "missing (required)"
    msg = str(err["msg"])
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    elif "input" in err and not isinstance(err["input"], dict | list):
        msg += f" (got {err['input']!r})"
    return msg


def validation_errors(
    exc: ValidationError, model: type[BaseModel] | None = None, path: str = ""
) -> list[ConfigError]:
    """One `ConfigError` per pydantic error, each naming its path under `path`.

    Unknown keys list the valid keys of their mapping (found through `model`) and suggest the
    closest; a value outside a fixed set lists the set.
    """
    out: list[ConfigError] = []
    for err in exc.errors():
        where: str | None = path or None
        for part in err["loc"]:
            where = join_path(where, part)
        out.append(ConfigError(_message(err, model), where))
    return out


def config_error(errors: Sequence[ConfigError]) -> ConfigError:
    """The error to raise for `errors` (non-empty): itself when alone, else a group of all."""
    if len(errors) == 1:
        return errors[0]
    return ConfigErrorGroup(list(errors))


def errors_of(exc: ConfigError) -> list[ConfigError]:
    """The individual errors inside `exc` (a group's members, else `exc` alone)."""
    return list(exc.errors) if isinstance(exc, ConfigErrorGroup) else [exc]


# -- YAML ----------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one) and
    nesting deeper than `MAX_YAML_DEPTH`."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise ConfigError(f"nested deeper than {MAX_YAML_DEPTH} levels", line=mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            mark = key_node.start_mark
            raise ConfigError(f"duplicate key {key!r}", line=mark.line + 1)
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


@dataclass
class YamlDocument:
    """A parsed YAML document and where each of its parts was written.

    Attributes:
        data: The parsed value.
        source: The file it came from (None for text).
        lines: 1-based line of every key and list item, by path (``plugins[0].type``). One entry
            per node of the document, so bounded by its size (an alias is walked once).
    """

    data: Any
    source: str | None = None
    lines: dict[str, int] = field(default_factory=dict)

    def line_of(self, path: str | None) -> int | None:
        """The line of `path`, or of the nearest enclosing part written in the file."""
        while path:
            line = self.lines.get(path)
            if line is not None:
                return line
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        return None

    def locate(self, exc: ConfigError) -> ConfigError:
        """`exc` (or each error of a group, in document order) with this document's file and
        line filled in."""
        located = [
            ConfigError(
                e.message,
                e.path,
                line=e.line if e.line is not None else self.line_of(e.path),
                source=e.source or self.source,
            )
            for e in errors_of(exc)
        ]
        # Document order: the order a reader fixes them in (errors without a line last).
        located.sort(key=lambda e: e.line if e.line is not None else math.inf)
        return ConfigErrorGroup(located) if isinstance(exc, ConfigErrorGroup) else located[0]


def _record_lines(node: yaml.Node, lines: dict[str, int]) -> None:
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(node, "")]
    while stack:
        current, path = stack.pop()
        if id(current) in seen:
            continue  # an alias: already walked
        seen.add(id(current))
        if isinstance(current, yaml.MappingNode):
            for key_node, value_node in current.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                child = join_path(path, str(key_node.value))
                lines.setdefault(child, key_node.start_mark.line + 1)
                stack.append((value_node, child))
        elif isinstance(current, yaml.SequenceNode):
            for i, item in enumerate(current.value):
                child = join_path(path, i)
                lines.setdefault(child, item.start_mark.line + 1)
                stack.append((item, child))


def _decode(raw: bytes, source: str | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"not UTF-8 text: byte 0x{raw[exc.start]:02x} cannot be decoded "
            "(save the file as UTF-8)",
            line=line,
            source=source,
        ) from None


def load_yaml(source: str | bytes | Path, name: str | None = None) -> YamlDocument:
    """Parse YAML text (`str` or UTF-8 `bytes`), or a file when `source` is a `Path`.

    Args:
        source: The text, or the file.
        name: What errors call the source (default: the file's path; none for text).

    Raises:
        ConfigError: Unreadable file, text that is not UTF-8, invalid YAML, duplicate keys or
            nesting deeper than `MAX_YAML_DEPTH`; the error carries the line where known.
    """
    if isinstance(source, Path):
        name = name or str(source)
        try:
            raw = source.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {source}: {exc.strerror or exc}") from None
        text = _decode(raw, name)
    elif isinstance(source, bytes):
        text = _decode(source, name)
    else:
        text = source
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "unparsable"
        raise ConfigError(
            f"invalid YAML: {problem}", line=mark.line + 1 if mark else None, source=name
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", source=name) from None
    except ConfigError as exc:
        raise ConfigError(exc.message, exc.path, line=exc.line, source=name) from None
    except RecursionError:
        # NOTE: the depth bound above stops ordinary files first; this catches a parse started
        # from an already deep stack.
        raise ConfigError("nested too deeply to parse", source=name) from None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    if node is not None:
        _record_lines(node, lines)
    return YamlDocument(data, name, lines)


def read_yaml(source: str | bytes | Path) -> Any:
    """The parsed value of `load_yaml(source)`.

    Raises:
        ConfigError: As `load_yaml`.
    """
    return load_yaml(source).data
