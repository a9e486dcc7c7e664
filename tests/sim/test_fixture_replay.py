"""The emulator replays the fixtures' scenarios and publishes exactly vLLM's frames.

The fixtures were captured from vLLM 0.33's own BlockPool and publisher with sha256 hashes, block
size 16 and an 8-block pool (the null block + 7). The same requests through the emulated engine
(same pool size, vLLM's sha256 hashing) must produce the same event batches, byte for byte: stores
with parents, hits not re-announced, tail-first eviction, the duplicate hash of an exact resend.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvaware_scorer.sim.engine import Engine
from kvaware_scorer.sim.wire import EventEncoder, KVEvent

from .helpers import make_engine, make_request, step


def _manifest(shared_fixtures: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((shared_fixtures / "manifest.json").read_text())
    return data


def _frame(
    shared_fixtures: Path, manifest: dict[str, Any], name: str, events: list[KVEvent]
) -> bytes:
    ts = manifest["files"][name]["wire"][0]
    return EventEncoder().encode(ts, events, 0)


def _drain(engine: Engine) -> list[list[KVEvent]]:
    batches = []
    while engine.has_work():
        out = step(engine)
        if out.events:
            batches.append(out.events)
    return batches


def test_main_stream_matches_vllm_byte_for_byte(shared_fixtures: Path) -> None:
    """Steps 0-6 of the main fixture stream come out of the emulator as the captured frames."""
    m = _manifest(shared_fixtures)
    ri = m["request_inputs"]
    engine, hasher = make_engine(8, 16, "sha256")
    # r1: 64-token prompt, then 16 decoded tokens fill its 5th block; it finishes after that.
    engine.add_request(make_request("r1", ri["r1"], 17, hasher))
    engine.waiting[0].tokens[64:80] = ri["r1_decode"]
    batches = _drain(engine)
    assert len(batches) == 2
    engine.add_request(make_request("r2", ri["r2"], 1, hasher))
    batches.append(step(engine).events)
    engine.add_request(make_request("r3", ri["r3"], 2, hasher))
    engine.add_request(make_request("r4", ri["r4"], 2, hasher))
    batches.append(step(engine).events)
    engine.add_request(make_request("r5", ri["r5"], 1, hasher))
    batches.append(step(engine).events)
    assert _drain(engine) == []
    assert engine.reset_prefix_cache()
    batches.append(engine.pool.take_events())
    names = [
        "batch_stored_int_hashes.msgpack",
        "batch_stored_decode_continuation.msgpack",
        "batch_stored_with_parent.msgpack",
        "batch_removed.msgpack",
        "batch_mixed.msgpack",
        "batch_all_cleared.msgpack",
    ]
    for name, events in zip(names, batches, strict=True):
        assert _frame(shared_fixtures, m, name, events) == (shared_fixtures / name).read_bytes(), (
            name
        )
    # r6: LoRA + cache salt + session id; the fixture's first event is the GPU store.
    r6 = ri["r6"]
    engine.add_request(
        make_request(
            "r6",
            r6["tokens"],
            1,
            hasher,
            lora_name=r6["lora_name"],
            lora_id=r6["lora_int_id"],
            cache_salt=r6["cache_salt"],
            session_id=r6["session_id"],
        )
    )
    events = step(engine).events
    enc = EventEncoder()
    mine = enc.decode(enc.encode(0.0, events))[1]
    theirs = enc.decode((shared_fixtures / "batch_with_lora_and_medium.msgpack").read_bytes())[1]
    assert mine == theirs[:1]


def test_duplicate_stream_matches_vllm_byte_for_byte(shared_fixtures: Path) -> None:
    """An exact resend re-stores its last block's hash; evicting the old copy removes it while cached."""
    m = _manifest(shared_fixtures)
    ri = m["request_inputs"]
    engine, hasher = make_engine(8, 16, "sha256")
    engine.add_request(make_request("ra", ri["r1"], 1, hasher))
    first = step(engine).events
    engine.add_request(make_request("rb", ri["r1"], 1, hasher))
    second = step(engine).events
    dup = ri["r1"][48:64]
    assert engine.pool.cached_hashes()[second[0].block_hashes[0]] == 2  # type: ignore[union-attr]
    assert dup == second[0].token_ids  # type: ignore[union-attr]
    engine.add_request(make_request("rc", ri["r3"] * 4, 1, hasher))
    third = step(engine).events
    for name, events in (
        ("batch_dup_first_store.msgpack", first),
        ("batch_dup_second_store.msgpack", second),
        ("batch_dup_removed_still_cached.msgpack", third),
    ):
        assert _frame(shared_fixtures, m, name, events) == (shared_fixtures / name).read_bytes(), (
            name
        )
    # The hash of the removed copy is still cached once (rb's copy).
    removed = third[0].block_hashes[0]  # type: ignore[union-attr]
    assert engine.pool.cached_hashes()[removed] == 1


def test_pool_state_matches_vllm_ground_truth(shared_fixtures: Path) -> None:
    """After the dup scenario the emulated pool holds the hashes and copy counts vLLM's did."""
    m = _manifest(shared_fixtures)
    ri = m["request_inputs"]
    engine, hasher = make_engine(8, 16, "sha256")
    for rid, toks in (("ra", ri["r1"]), ("rb", ri["r1"]), ("rc", ri["r3"] * 4)):
        engine.add_request(make_request(rid, toks, 1, hasher))
        step(engine)
    truth = m["files"]["batch_dup_removed_still_cached.msgpack"]["pool_state_after"]["GPU"]
    expected = {int(e["u64_hex"], 16): e["physical_blocks"] for e in truth}
    assert engine.pool.cached_hashes() == expected
