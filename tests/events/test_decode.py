"""vLLM wire decoding: every fixture, both event forms, hash forms, and malformed input."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from kvaware_scorer.errors import EventDecodeError
from kvaware_scorer.events.decode import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventDecoder,
    encode_batch,
    event_fields,
)
from tests.events.conftest import EVENTS_DIR, LEGACY_DIR

ENC = msgspec.msgpack.Encoder()


def _normalize(value: Any) -> Any:
    """Manifest hash views -> the u64 value vLLM's int form carries."""
    if isinstance(value, dict) and "u64" in value:
        return value["u64"]
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    return value


def _expected_events(entry: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: _normalize(v) for k, v in ev.items()} for ev in entry["batch"]["events"]]


@pytest.mark.parametrize("directory", [EVENTS_DIR, LEGACY_DIR], ids=["0.33", "0.23"])
def test_every_fixture_decodes_to_its_manifest(directory: Any) -> None:
    """Each fixture payload decodes to exactly the events, ts and DP rank its manifest lists."""
    from tests.events.conftest import load_manifest

    man = load_manifest(directory)
    dec = EventDecoder()
    assert man["files"], "no fixtures found"
    for name, entry in man["files"].items():
        batch = dec.decode((directory / name).read_bytes())
        assert batch.rejected == [], name
        assert batch.ts == entry["batch"]["ts"], name
        assert batch.data_parallel_rank == entry["batch"]["data_parallel_rank"], name
        assert batch.legacy == (directory == LEGACY_DIR), name
        got = [event_fields(e) for e in batch.events]
        assert got == _expected_events(entry), name


@pytest.mark.parametrize("directory", [EVENTS_DIR, LEGACY_DIR], ids=["0.33", "0.23"])
def test_encoding_reproduces_vllm_bytes(directory: Any) -> None:
    """Re-encoding a decoded int-hash fixture gives back vLLM's exact bytes (both forms)."""
    dec = EventDecoder()
    checked = 0
    for path in sorted(directory.glob("*.msgpack")):
        if "bytes" in path.name:
            continue  # decoded hashes are the low 64 bits, not the digests
        raw = path.read_bytes()
        b = dec.decode(raw)
        assert encode_batch(b.events, b.ts, b.data_parallel_rank, legacy=b.legacy) == raw, path
        checked += 1
    assert checked >= 8


def test_bytes_hashes_are_low_64_bits(manifest: dict[str, Any]) -> None:
    """32-byte digest hashes (and parents) decode to their last 8 bytes read big-endian."""
    dec = EventDecoder()
    for name in ("batch_stored_bytes_hashes.msgpack", "batch_stored_bytes_with_parent.msgpack"):
        entry = manifest["files"][name]
        ev = dec.decode((EVENTS_DIR / name).read_bytes()).events[0]
        assert isinstance(ev, BlockStored)
        views = entry["batch"]["events"][0]["block_hashes"]
        assert all(v["wire_type"] == "bytes" for v in views)
        assert ev.block_hashes == [int(v["hex"][-16:], 16) for v in views]
        parent = entry["batch"]["events"][0]["parent_block_hash"]
        assert ev.parent_block_hash == (None if parent is None else parent["u64"])


def test_int_hashes_of_every_width_and_above_2_63() -> None:
    """Hashes in every msgpack int width, up to 2**64-1, decode unchanged."""
    hashes = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
    payload = ENC.encode(
        [
            1.5,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": hashes,
                    "parent_block_hash": 2**64 - 1,
                    "token_ids": list(range(len(hashes))),
                    "block_size": 1,
                    "lora_id": None,
                    "medium": "GPU",
                    "lora_name": None,
                },
                {"type": "BlockRemoved", "block_hashes": [2**64 - 1], "medium": None},
            ],
            0,
        ]
    )
    b = EventDecoder().decode(payload)
    stored, removed = b.events
    assert isinstance(stored, BlockStored) and isinstance(removed, BlockRemoved)
    assert stored.block_hashes == hashes and stored.parent_block_hash == 2**64 - 1
    assert removed.block_hashes == [2**64 - 1] and removed.medium is None


def test_mixed_int_and_bytes_hashes_in_one_event() -> None:
    """An event mixing int and bytes hashes decodes with every hash as an int."""
    payload = ENC.encode(
        [0.0, [{"type": "BlockRemoved", "block_hashes": [5, b"\x00" * 24 + b"\x01" * 8]}]]
    )
    ev = EventDecoder().decode(payload).events[0]
    assert isinstance(ev, BlockRemoved)
    assert ev.block_hashes == [5, 0x0101010101010101]


def test_unknown_fields_absent_optionals_and_nil_required_fields() -> None:
    """Unknown map keys are ignored, absent optional fields default, nil required fields are
    kept as None."""
    event = {
        "type": "BlockStored",
        "block_hashes": [9],
        "parent_block_hash": None,
        "token_ids": [1, 2],
        "block_size": 2,
        "lora_id": None,
        "medium": None,
        "lora_name": None,
        "some_future_field": {"nested": [1, 2, 3]},
    }
    b = EventDecoder().decode(ENC.encode([2.0, [event]]))
    ev = b.events[0]
    assert isinstance(ev, BlockStored)
    assert ev.medium is None and ev.lora_name is None and ev.extra_keys is None
    assert ev.group_idx is None and ev.kv_cache_spec_kind is None
    assert b.data_parallel_rank is None  # a 2-element batch


def test_tag_need_not_be_the_first_map_key() -> None:
    """A map event whose "type" key comes last still decodes."""
    payload = ENC.encode([0.0, [{"block_hashes": [1], "medium": "CPU", "type": "BlockRemoved"}], 3])
    b = EventDecoder().decode(payload)
    assert isinstance(b.events[0], BlockRemoved) and b.data_parallel_rank == 3


def test_legacy_arrays_shorter_and_longer_than_0_23() -> None:
    """Positional events with fewer fields (vLLM 0.11: six) or extra trailing ones decode."""
    short = ["BlockStored", [7, 8], None, [1, 2, 3, 4], 2, None, "GPU"]
    long_ = ["BlockRemoved", [7], "GPU", 0, "LOCAL", "owner", "future", 1]
    b = EventDecoder().decode(ENC.encode([1.0, [short, long_, ["AllBlocksCleared", 1]], 0]))
    assert b.legacy and b.rejected == []
    st, rm, cl = b.events
    assert isinstance(st, BlockStored) and st.lora_name is None and st.medium == "GPU"
    assert isinstance(rm, BlockRemoved) and rm.locality == "LOCAL" and rm.ownership == "owner"
    assert isinstance(cl, AllBlocksCleared)


def test_unknown_event_types_are_skipped_and_reported() -> None:
    """Unknown event types are rejected one by one while the batch's good events are kept."""
    events = [
        {"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU"},
        {"type": "BlockPinned", "block_hashes": [1]},
        ["SomethingNew", 1, 2],
        {"type": "BlockRemoved", "block_hashes": [2], "medium": "GPU"},
    ]
    b = EventDecoder().decode(ENC.encode([1.0, events, 0]))
    assert [e.block_hashes for e in b.events if isinstance(e, BlockRemoved)] == [[1], [2]]
    assert b.rejected == ["unknown_event_type", "unknown_event_type"]


@pytest.mark.parametrize(
    "event",
    [
        {"type": "BlockRemoved", "block_hashes": [-1], "medium": "GPU"},
        {"type": "BlockRemoved", "block_hashes": [b""], "medium": "GPU"},
        {"type": "BlockRemoved", "block_hashes": None, "medium": "GPU"},
        {"type": "BlockRemoved", "block_hashes": ["abc"], "medium": "GPU"},
        {"type": "BlockRemoved", "medium": "GPU"},
        {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None},
        {
            "type": "BlockStored",
            "block_hashes": [1],
            "parent_block_hash": None,
            "token_ids": [2**40],
            "block_size": 1,
        },
        {
            "type": "BlockStored",
            "block_hashes": [1],
            "parent_block_hash": None,
            "token_ids": [1],
            "block_size": -4,
        },
        {"type": 7},
        "BlockStored",
        17,
        None,
    ],
)
def test_malformed_events_are_rejected_individually(event: Any) -> None:
    """A malformed event is rejected as malformed_event; its neighbours still decode."""
    good = {"type": "AllBlocksCleared"}
    b = EventDecoder().decode(ENC.encode([1.0, [good, event, good], 0]))
    assert len(b.events) == 2 and all(isinstance(e, AllBlocksCleared) for e in b.events)
    assert b.rejected == ["malformed_event"]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        b"\x93\xcb",
        ENC.encode({"ts": 1.0, "events": []}),
        ENC.encode([1.0]),
        ENC.encode(["now", [], 0]),
        ENC.encode([1.0, {"type": "AllBlocksCleared"}, 0]),
        ENC.encode([1.0, [], "rank"]),
        ENC.encode([1.0, [], -1]),
        ENC.encode(None),
    ],
)
def test_unusable_payloads_raise_a_countable_error(payload: bytes) -> None:
    """A payload that is not an EventBatch raises EventDecodeError with reason decode_error."""
    with pytest.raises(EventDecodeError) as err:
        EventDecoder().decode(payload)
    assert err.value.reason == "decode_error"


def test_integer_timestamp_is_accepted() -> None:
    """A batch whose timestamp is an int (not float64) still decodes."""
    b = EventDecoder().decode(ENC.encode([17, [], 0]))
    assert b.ts == 17.0 and b.events == []
