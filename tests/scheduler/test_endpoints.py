"""The endpoints file: validation with YAML paths, reload on change, purge of removed pods."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler import (
    Endpoint,
    EndpointsWatcher,
    Scheduler,
    SchedulingRequest,
    load_endpoints,
    make_plugin_manager,
)

from .conftest import FakeClock, config

ROOT = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> None:
    path.write_text(text)
    # NOTE: make each rewrite visible to an mtime check even on coarse filesystem clocks.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_example_file_loads() -> None:
    """config/endpoints.example.yaml parses into endpoints with ids, labels and event endpoints."""
    eps = load_endpoints(ROOT / "config" / "endpoints.example.yaml")
    assert [e.id for e in eps] == [
        "10.0.0.1:8000",
        "10.0.0.2:8000",
        "10.0.0.3:8000",
        "10.0.0.4:30000",
    ]
    assert eps[0].labels == {"llm-d.ai/role": "decode"}
    assert eps[0].kv_events == "tcp://10.0.0.1:5557"
    assert eps[0].kv_events_replay == "tcp://10.0.0.1:5558"
    assert eps[0].model == "Qwen/Qwen3-32B"
    assert eps[2].port == 8000 and eps[2].kv_events is None
    assert [e.engine for e in eps] == [None, None, None, "sglang"]
    assert (eps[1].node_address, eps[1].pod) == ("10.0.1.5", "vllm-1-6b8f9c")


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("endpoints:\n  - {name: a, address: 10.0.0.1}\n", "endpoints[0].port"),
        (
            "endpoints:\n  - {name: a, address: 10.0.0.1, port: 8000}\n  - {address: 10.0.0.2, port: 99999}\n",
            "endpoints[1].port",
        ),
        ("endpoints:\n  - {address: 10.0.0.1, port: 8000, labls: {}}\n", "endpoints[0].labls"),
        (
            "endpoints:\n  - {address: 10.0.0.1, port: 8000}\n  - {address: 10.0.0.1, port: '8000'}\n",
            "endpoints[1]",
        ),
        ("endpoint: []\n", "endpoint"),
        (
            "endpoints:\n  - {address: 10.0.0.1, port: 8000, engine: trtllm}\n",
            "endpoints[0].engine",
        ),
    ],
)
def test_invalid_files_name_the_path(tmp_path: Path, text: str, path: str) -> None:
    """Invalid endpoint files fail with a ConfigError naming the entry and key."""
    f = tmp_path / "endpoints.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_endpoints(f)
    assert info.value.path == path


def test_watcher_reloads_and_keeps_endpoint_objects(tmp_path: Path) -> None:
    """A changed file is reloaded; pods that stay keep their Endpoint object (and metrics)."""
    f = tmp_path / "endpoints.yaml"
    write(
        f, "endpoints:\n  - {address: 10.0.0.1, port: 8000}\n  - {address: 10.0.0.2, port: 8000}\n"
    )
    seen: list[list[str]] = []
    w = EndpointsWatcher(f, lambda eps: seen.append([e.id for e in eps]), poll_interval=0.05)
    first = w.load()
    assert not w.check()  # unchanged
    write(
        f,
        "endpoints:\n  - {address: 10.0.0.1, port: 8000, labels: {zone: b}, pod: vllm-0, "
        "nodeAddress: 10.1.0.9}\n  - {address: 10.0.0.3, port: 8000}\n",
    )
    assert w.check()
    second = w.endpoints
    assert second[0] is first[0] and second[0].labels == {"zone": "b"}
    assert (second[0].pod, second[0].node_address) == ("vllm-0", "10.1.0.9")
    assert (second[1].pod, second[1].node_address) == (None, None)
    assert seen == [["10.0.0.1:8000", "10.0.0.2:8000"], ["10.0.0.1:8000", "10.0.0.3:8000"]]


def test_bad_reload_keeps_the_previous_pool(tmp_path: Path) -> None:
    """A broken rewrite is reported and the previous endpoints stay in force."""
    f = tmp_path / "endpoints.yaml"
    write(f, "endpoints:\n  - {address: 10.0.0.1, port: 8000}\n")
    calls: list[int] = []
    w = EndpointsWatcher(f, lambda eps: calls.append(len(eps)))
    w.load()
    write(f, "endpoints:\n  - {address: 10.0.0.1}\n")
    assert not w.check()
    assert [e.id for e in w.endpoints] == ["10.0.0.1:8000"]
    assert calls == [1]


def test_file_reload_purges_removed_pods_from_the_index(tmp_path: Path) -> None:
    """A pod removed from the watched file is purged from the precise index by the background watcher."""
    f = tmp_path / "endpoints.yaml"
    write(
        f, "endpoints:\n" + "".join(f"  - {{address: 10.0.0.{i}, port: 8000}}\n" for i in range(3))
    )
    s = Scheduler.from_config(
        config(
            [
                {
                    "type": "precise-prefix-cache-scorer",
                    "parameters": {"tokenProcessorConfig": {"blockSize": 4}},
                }
            ]
        ),
        plugin_manager=make_plugin_manager(use_env=False),
        clock=FakeClock(),
        seed=0,
    )
    s.use_endpoints_file(f, poll_interval=0.02, scrape=False)
    assert [e.id for e in s.endpoints] == ["10.0.0.0:8000", "10.0.0.1:8000", "10.0.0.2:8000"]
    indexer = s.plugin("precise-prefix-cache-scorer").indexer
    keys = indexer.block_keys(list(range(32)), "m")
    for e in s.endpoints:
        indexer.index.add(e.id, keys)
    # the in-memory subscriber is not needed: no start() of plugins, only the watcher
    s._watcher.start()
    try:
        write(
            f,
            "endpoints:\n  - {address: 10.0.0.0, port: 8000}\n  - {address: 10.0.0.2, port: 8000}\n",
        )
        deadline = time.monotonic() + 5
        while "10.0.0.1:8000" in indexer.index.pods() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        s._watcher.stop()
    assert "10.0.0.1:8000" not in indexer.index.pods()
    assert sorted(indexer.index.pods()) == ["10.0.0.0:8000", "10.0.0.2:8000"]
    assert [e.id for e in s.endpoints] == ["10.0.0.0:8000", "10.0.0.2:8000"]
    r = s.schedule(SchedulingRequest("r", "m", token_ids=list(range(32))))
    assert r.candidates == ["10.0.0.0:8000", "10.0.0.2:8000"]


def test_endpoint_id_is_address_and_port() -> None:
    """An endpoint's id is '<address>:<port>', the pod id KV events use."""
    assert Endpoint("x", "10.1.2.3", 8080).id == "10.1.2.3:8080"
