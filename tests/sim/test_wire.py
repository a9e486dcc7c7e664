"""Wire encoding: the emulator's payloads are byte-identical to vLLM's captured frames."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvaware_scorer.sim.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventEncoder,
    event_extra_keys,
)

KINDS = {
    "BlockStored": BlockStored,
    "BlockRemoved": BlockRemoved,
    "AllBlocksCleared": AllBlocksCleared,
}


def _load(shared_fixtures: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((shared_fixtures / "manifest.json").read_text())
    return manifest


def _from_view(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"$bytes"}:
        return bytes.fromhex(value["$bytes"])
    if isinstance(value, dict):
        return {k: _from_view(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_view(v) for v in value]
    return value


def test_every_captured_frame_reencodes_byte_for_byte(shared_fixtures: Path) -> None:
    """Each fixture's decoded events, re-encoded with the emulator's structs, equal vLLM's bytes."""
    manifest = _load(shared_fixtures)
    enc = EventEncoder()
    assert len(manifest["files"]) >= 16
    for name, info in manifest["files"].items():
        ts, events, rank = _from_view(info["wire"])
        structs = []
        for ev in events:
            fields = dict(ev)
            structs.append(KINDS[fields.pop("type")](**fields))
        assert enc.encode(ts, structs, rank) == (shared_fixtures / name).read_bytes(), name


def test_extra_keys_follow_vllm_event_form() -> None:
    """LoRA names go on every block, the cache salt on block 0 only, nils without either."""
    assert event_extra_keys(2, 0, None, None) == [None, None]
    assert event_extra_keys(3, 0, "sql-lora", "tenant-a") == [
        ["sql-lora", "tenant-a"],
        ["sql-lora"],
        ["sql-lora"],
    ]
    assert event_extra_keys(2, 1, None, "tenant-a") == [None, None]


def test_hashes_above_two_to_the_63_use_uint64() -> None:
    """A hash >= 2**63 is written as msgpack uint64 (0xcf), never as a signed int."""
    enc = EventEncoder()
    big = (1 << 64) - 1
    payload = enc.encode(1.0, [BlockRemoved([big], "GPU", 0)])
    assert b"\xcf" + big.to_bytes(8, "big") in payload
    assert enc.decode(payload)[1][0]["block_hashes"] == [big]


@pytest.mark.parametrize("rank", [0, 1, None])
def test_batch_is_a_three_element_array(rank: int | None) -> None:
    """The batch is [ts(float64), events, data_parallel_rank] with the rank always present."""
    enc = EventEncoder()
    payload = enc.encode(5, [AllBlocksCleared()], rank)
    assert payload[0] == 0x93 and payload[1] == 0xCB
    assert enc.decode(payload) == [5.0, [{"type": "AllBlocksCleared"}], rank]


def test_emulator_events_are_the_wire_module_records() -> None:
    """The emulator's events are the decoder's records in vLLM's layout, and its frames are
    `encode_batch`'s, decoding back to the same events in both the map and legacy forms."""
    from kvaware_scorer.events import decode

    assert issubclass(BlockStored, decode.BlockStored)
    assert issubclass(BlockRemoved, decode.BlockRemoved)
    assert AllBlocksCleared is decode.AllBlocksCleared
    events = [
        BlockStored([7, 8], 6, list(range(32)), 16, None, "GPU", "sql-lora", [["sql-lora"]] * 2),
        BlockRemoved([7], "GPU", 0),
        AllBlocksCleared(),
    ]
    payload = EventEncoder().encode(2.0, events, 1)
    assert payload == decode.encode_batch(events, 2.0, 1)
    for legacy in (False, True):
        frame = decode.encode_batch(events, 2.0, 1, legacy=legacy)
        batch = decode.EventDecoder().decode(frame)
        assert batch.legacy == legacy and batch.rejected == []
        assert [decode.event_fields(e) for e in batch.events] == [
            decode.event_fields(e) for e in events
        ]
