"""Config reading and errors in one voice: hostile files, every error listed, suggestions, lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from kvaware_scorer import IndexerConfig
from kvaware_scorer.config import load_model
from kvaware_scorer.configio import (
    MAX_YAML_DEPTH,
    closest,
    errors_of,
    load_yaml,
    parse_duration,
    read_yaml,
)
from kvaware_scorer.errors import ConfigError, ConfigErrorGroup
from kvaware_scorer.gateway.config import load_gateway_config
from kvaware_scorer.scheduler import (
    EndpointsWatcher,
    PluginRegistry,
    load_config,
    load_endpoints,
    make_plugin_manager,
)
from kvaware_scorer.scheduler import config as scheduler_config
from kvaware_scorer.scheduler.manager import Hooks
from kvaware_scorer.scheduler.metrics import SchedulerMetrics

ROOT = Path(__file__).resolve().parents[1]

#: The two hostile files of the security review: 5,000 nested lists in 10 KB, and Latin-1 text.
DEEP = "[" * 5000 + "]" * 5000 + "\n"
NOT_UTF8 = b"apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n# caf\xe9\nplugins: []\n"


@pytest.fixture
def registry() -> PluginRegistry:
    reg = PluginRegistry()
    Hooks(make_plugin_manager()).register_plugins(reg)
    return reg


def hostile_files(tmp_path: Path) -> list[tuple[Path, str]]:
    deep = tmp_path / "deep.yaml"
    deep.write_text(DEEP)
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes(NOT_UTF8)
    return [
        (deep, f"deep.yaml:1: nested deeper than {MAX_YAML_DEPTH} levels"),
        (latin, "latin1.yaml:3: not UTF-8 text: byte 0xe9"),
    ]


def test_hostile_yaml_is_a_config_error_on_every_library_path(
    tmp_path: Path, registry: PluginRegistry
) -> None:
    """Deeply nested and non-UTF-8 files raise a ConfigError naming file and line from each loader."""
    for path, expected in hostile_files(tmp_path):
        loaders = (
            read_yaml,
            lambda p: load_config(p, registry),
            load_gateway_config,
            load_endpoints,
        )
        for load in loaders:
            with pytest.raises(ConfigError) as info:
                load(path)
            assert expected in str(info.value)
    with pytest.raises(ConfigError, match="nested deeper"):
        read_yaml(DEEP)
    with pytest.raises(ConfigError, match="line 2: not UTF-8"):
        read_yaml(b"a: 1\nb: \xff\n")


@pytest.mark.parametrize("command", ["validate", "serve"])
def test_hostile_yaml_from_the_cli_is_one_clear_line(tmp_path: Path, command: str) -> None:
    """`kvaware validate` and `serve --gateway-config` exit 1 with the error, no traceback."""
    for path, expected in hostile_files(tmp_path):
        args = (
            [str(path)]
            if command == "validate"
            else [
                "--config",
                str(ROOT / "config" / "precise.yaml"),
                "--endpoints",
                str(ROOT / "config" / "endpoints.example.yaml"),
                "--gateway-config",
                str(path),
                "--port",
                "0",
            ]
        )
        proc = subprocess.run(
            [sys.executable, "-m", "kvaware_scorer.cli", command, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        assert expected in proc.stderr


def test_nesting_at_the_bound_still_loads() -> None:
    """A document exactly MAX_YAML_DEPTH levels deep loads; one level more is refused."""
    ok = "[" * MAX_YAML_DEPTH + "]" * MAX_YAML_DEPTH
    value = read_yaml(ok)
    for _ in range(MAX_YAML_DEPTH - 1):
        value = value[0]
    assert value == []
    with pytest.raises(ConfigError):
        read_yaml("[" + ok + "]")


def test_invalid_yaml_gives_the_line_not_a_parser_dump() -> None:
    """A syntax error names the YAML problem and its line in one line of text."""
    with pytest.raises(ConfigError) as info:
        read_yaml("a: 1\nb: [1, 2\nc: 3\n")
    assert info.value.line is not None and info.value.line >= 2
    assert str(info.value).startswith(f"line {info.value.line}: invalid YAML: ")
    assert "\n" not in str(info.value)


def test_lines_are_tracked_per_key_and_item() -> None:
    """load_yaml records the line of every key and list item, and of the nearest written parent."""
    doc = load_yaml("a:\n  b:\n    - x: 1\n    - y: 2\nc: 3\n")
    assert doc.line_of("a.b[1].y") == 4
    assert doc.line_of("a.b[0]") == 3
    assert doc.line_of("c") == 5
    assert doc.line_of("a.b[1].missing") == 4
    assert doc.line_of("nowhere") is None


@pytest.mark.parametrize(
    ("word", "choices", "expected"),
    [
        ("speculativeTTl", ["speculativeTTL", "speculativeIndexing"], "speculativeTTL"),
        ("maxBodyBytess", ["maxBodyBytes", "maxAttempts"], "maxBodyBytes"),
        ("block_size", ["blockSize", "hashSeed"], "blockSize"),
        ("weigth", ["pluginRef", "weight"], "weight"),
        ("zzz", ["pluginRef", "weight"], None),
    ],
)
def test_closest_valid_key(word: str, choices: list[str], expected: str | None) -> None:
    """The suggestion is the key the word most likely misspells, or none when nothing is close."""
    assert closest(word, choices) == expected


def test_gateway_config_lists_every_error_with_suggestion_and_line(tmp_path: Path) -> None:
    """The gateway config reports all errors in document order, each with its line, the valid
    keys and the closest one."""
    path = tmp_path / "gw.yaml"
    path.write_text("host: 0.0.0.0\nmaxBodyBytess: 2048\nconnectTimeout: soon\nmaxAttempts: 0\n")
    with pytest.raises(ConfigErrorGroup) as info:
        load_gateway_config(path)
    text = str(info.value)
    assert "more error" not in text
    errors = info.value.errors
    assert [(e.path, e.line) for e in errors] == [
        ("maxBodyBytess", 2),
        ("connectTimeout", 3),
        ("maxAttempts", 4),
    ]
    assert str(errors[0]) == (
        f"{path}:2: maxBodyBytess: unknown key; did you mean 'maxBodyBytes'? (valid: "
        + ", ".join(
            f.alias or n for n, f in load_gateway_config(None).__class__.model_fields.items()
        )
        + ")"
    )
    assert "Value error" not in text and "not a duration: 'soon'" in text


def test_indexer_config_raises_config_errors_not_pydantic_ones() -> None:
    """IndexerConfig(...) and model_validate raise a ConfigError per problem, with suggestions."""
    bad = {
        "tokenProcessorConfig": {"blokSize": 16, "keyMode": "vlm"},
        "kvBlockIndexConfig": {"inMemoryConfig": {"sise": 3}},
    }
    for build in (lambda: IndexerConfig(**bad), lambda: IndexerConfig.model_validate(bad)):
        with pytest.raises(ConfigErrorGroup) as info:
            build()
        by_path = {e.path: e.message for e in info.value.errors}
        assert by_path == {
            "tokenProcessorConfig.blokSize": "unknown key; did you mean 'blockSize'? "
            "(valid: blockSize, hashSeed, hashAlgorithm, keyMode, loraAdapters, vllmHashGeneration)",
            "tokenProcessorConfig.keyMode": "'vlm' is not a valid choice; did you mean 'vllm'? "
            "(valid: derived, vllm)",
            "kvBlockIndexConfig.inMemoryConfig.sise": "unknown key; did you mean 'size'? "
            "(valid: size, podCacheSize)",
        }
        assert "Extra inputs" not in str(info.value)
    with pytest.raises(ConfigError) as one:
        load_model(IndexerConfig, {"matchLengthWeigth": 0.5}, "indexerConfig")
    assert str(one.value).startswith(
        "indexerConfig.matchLengthWeigth: unknown key; did you mean 'matchLengthWeight'?"
    )
    good = IndexerConfig(tokenProcessorConfig={"blockSize": 32})
    assert good.token_processor_config.block_size == 32


def test_scheduler_errors_carry_file_lines(tmp_path: Path, registry: PluginRegistry) -> None:
    """A scheduler YAML's errors each name the line of the offending key and suggest a fix."""
    path = tmp_path / "bad.yaml"
    path.write_text(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
        "  - type: precise-prefix-cache-scorer\n    parameters:\n      speculativeTTl: 2s\n"
        "  - type: queue-scorer\nschedulingProfiles:\n  - name: default\n    plugins:\n"
        "      - pluginRef: queue-scorer\n        weigth: 3\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, registry)
    errors = errors_of(info.value)
    assert [(e.path, e.line) for e in errors] == [
        ("plugins[0].parameters.speculativeTTl", 6),
        ("schedulingProfiles[0].plugins[0].weigth", 12),
    ]
    assert "did you mean 'speculativeTTL'?" in errors[0].message
    assert errors[1].message == "unknown key; did you mean 'weight'? (valid: pluginRef, weight)"
    assert str(errors[1]).startswith(f"{path}:12: schedulingProfiles[0].plugins[0].weigth: ")


def test_old_import_names_still_work() -> None:
    """read_yaml, parse_duration and ConfigErrorGroup are still importable from the scheduler."""
    assert scheduler_config.read_yaml is read_yaml
    assert scheduler_config.parse_duration is parse_duration
    assert scheduler_config.ConfigErrorGroup is ConfigErrorGroup


def test_failed_endpoint_reloads_are_counted(tmp_path: Path) -> None:
    """Every failed reload (bad values, deep nesting, not UTF-8) counts as an error and keeps
    the previous pool; a good one counts as ok."""
    f = tmp_path / "endpoints.yaml"
    f.write_text("endpoints:\n  - {address: 10.0.0.1, port: 8000}\n")
    registry = CollectorRegistry()
    metrics = SchedulerMetrics(registry)
    w = EndpointsWatcher(f, lambda eps: None, metrics=metrics)
    w.load()

    def count(result: str) -> float:
        value = registry.get_sample_value("kvaware_endpoint_reloads_total", {"result": result})
        return value or 0.0

    assert count("ok") == 1.0
    bad: list[bytes] = [b"endpoints:\n  - {address: 10.0.0.1}\n", DEEP.encode(), NOT_UTF8]
    for n, content in enumerate(bad, 1):
        f.write_bytes(content)
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + n * 1_000_000_000))
        assert not w.check()
        with pytest.raises(ConfigError, match=f"^{re.escape(str(f))}:"):
            w.load()
        assert count("error") == float(n)
        assert [e.id for e in w.endpoints] == ["10.0.0.1:8000"]
    assert count("ok") == 1.0
