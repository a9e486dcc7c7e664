"""Upstream's ``file-discovery`` plugin: its endpoints file becomes the scheduler's pool."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler import Scheduler

from .conftest import ROOT


def _config(path: Path, watch: bool) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "config" / "load.yaml").read_text())
    data["plugins"].append(
        {"type": "file-discovery", "parameters": {"path": str(path), "watchFile": watch}}
    )
    data["dataLayer"] = {"discovery": {"pluginRef": "file-discovery"}}
    return data


def _upstream_file(path: Path, ports: list[int]) -> None:
    # Upstream's format: ports as strings, a namespace, labels.
    path.write_text(
        yaml.safe_dump(
            {
                "endpoints": [
                    {"name": f"vllm-{p}", "namespace": "default", "address": "127.0.0.1",
                     "port": str(p), "labels": {"app": "vllm"}}
                    for p in ports
                ]
            }
        )
    )  # fmt: skip


def test_the_file_is_the_pool_and_watch_file_reloads_it(tmp_path: Path) -> None:
    """The plugin's file is loaded when the scheduler is built and, with watchFile, reloaded."""
    path = tmp_path / "endpoints.yaml"
    _upstream_file(path, [8001, 8002])
    scheduler = Scheduler.from_config(_config(path, watch=True))
    try:
        assert {e.id for e in scheduler.endpoints} == {"127.0.0.1:8001", "127.0.0.1:8002"}
        assert scheduler.endpoints[0].labels == {"app": "vllm"}
        scheduler.start()
        time.sleep(0.05)
        _upstream_file(path, [8003])
        deadline = time.monotonic() + 5
        while {e.id for e in scheduler.endpoints} != {"127.0.0.1:8003"}:
            assert time.monotonic() < deadline, "the file was not reloaded"
            time.sleep(0.05)
    finally:
        scheduler.close()


def test_a_missing_file_fails_the_start(tmp_path: Path) -> None:
    """A file-discovery path that does not exist is a configuration error naming it."""
    with pytest.raises(ConfigError, match="endpoints"):
        Scheduler.from_config(_config(tmp_path / "nope.yaml", watch=False))
