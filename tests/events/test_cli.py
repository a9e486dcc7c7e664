"""The ``kvaware events`` command: decoding captured payloads and listening to live streams."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from kvaware_scorer.cli import main
from kvaware_scorer.events import VllmEventPublisher
from kvaware_scorer.events.decode import BlockStored
from tests.conftest import free_port
from tests.events.conftest import EVENTS_DIR, LEGACY_DIR


def test_decode_prints_one_json_line_per_payload(capsys: pytest.CaptureFixture[str]) -> None:
    """Each payload file becomes one JSON line with its events, hashes in hex."""
    files = [EVENTS_DIR / "batch_mixed.msgpack", LEGACY_DIR / "batch_with_lora_and_medium.msgpack"]
    assert main(["events", "decode", *map(str, files)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["form"] for x in lines] == ["map", "array"]
    mixed = lines[0]["events"]
    assert [e["type"] for e in mixed] == ["BlockRemoved"] * 4 + ["BlockStored"]
    assert mixed[0]["block_hashes"] == ["03f8341d418ea703"]
    assert lines[1]["events"][0]["lora_name"] == "sql-lora"


def test_decode_reports_unreadable_files(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    """A file that is not an EventBatch is reported on stderr with a non-zero exit code."""
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(b"\xc1")
    assert main(["events", "decode", str(bad)]) == 1
    assert "decode_error" in capsys.readouterr().err


def test_listen_reports_per_pod_streams(capsys: pytest.CaptureFixture[str]) -> None:
    """listen dials a pod and reports its stream (seq, hashes held, model) each interval."""
    port = free_port()
    pub = VllmEventPublisher(f"tcp://127.0.0.1:{port}", topic="kv@ignored@llama", bind=True)

    def publish() -> None:
        if pub.wait_for_subscriber(10):
            ev = BlockStored([1, 2], None, list(range(32)), 16, medium="GPU", group_idx=0)
            pub.publish([ev])

    t = threading.Thread(target=publish)
    t.start()
    try:
        argv = ["events", "listen", "--connect", f"10.0.0.1:8000=tcp://127.0.0.1:{port}"]
        t0 = time.monotonic()
        assert main([*argv, "--interval", "0.5", "--duration", "1.5"]) == 0
        assert time.monotonic() - t0 < 5
    finally:
        t.join()
        pub.close()
    out = capsys.readouterr().out
    assert "10.0.0.1:8000: rank 0: seq 0, 2 hashes, model llama" in out


def test_listen_needs_a_source(capsys: pytest.CaptureFixture[str]) -> None:
    """listen without --bind or --connect exits with a usage error."""
    assert main(["events", "listen"]) == 2
    assert "--bind" in capsys.readouterr().err


@pytest.mark.parametrize("depth", [996, 20_000])
def test_decode_reports_deeply_nested_files(
    capsys: pytest.CaptureFixture[str], tmp_path: Any, depth: int
) -> None:
    """A payload nested too deep to decode or to print is reported, never a traceback."""
    from tests.events.test_hardening import poison

    bad = tmp_path / "deep.msgpack"
    bad.write_bytes(poison(depth))
    assert main(["events", "decode", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "deep.msgpack" in err and "Traceback" not in err
