"""Shared pieces for the KV-event tests: the vLLM fixture manifest and per-stream frame lists."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvaware_scorer.indexer import Indexer
from tests.conftest import FIXTURES

EVENTS_DIR = FIXTURES / "vllm-kv-events"
LEGACY_DIR = EVENTS_DIR / "legacy-0.23"


def load_manifest(directory: Path = EVENTS_DIR) -> dict[str, Any]:
    """The fixture manifest of `directory`."""
    data: dict[str, Any] = json.loads((directory / "manifest.json").read_text())
    return data


def stream_frames(manifest: dict[str, Any]) -> dict[str | None, list[tuple[int, str]]]:
    """Publisher endpoint -> [(seq, file name)] in seq order (one list per vLLM publisher)."""
    out: dict[str | None, list[tuple[int, str]]] = {}
    for name, entry in manifest["files"].items():
        out.setdefault(entry["publisher_endpoint"], []).append((entry["frames"]["seq"], name))
    for frames in out.values():
        frames.sort()
    return out


@pytest.fixture(scope="session")
def manifest() -> dict[str, Any]:
    """The vLLM 0.33.0 fixture manifest."""
    return load_manifest()


@pytest.fixture(scope="session")
def legacy_manifest() -> dict[str, Any]:
    """The vLLM 0.23.0 (array form) fixture manifest."""
    return load_manifest(LEGACY_DIR)


@pytest.fixture
def indexer() -> Iterator[Indexer]:
    """An empty in-memory indexer, closed after the test."""
    ix = Indexer()
    yield ix
    ix.close()
