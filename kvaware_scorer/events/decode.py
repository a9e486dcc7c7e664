"""vLLM's KV-event wire format, declared once: typed records, decoding of both forms, encoding.

This is the one wire module: the decoder, `encode_batch` (tests, the publisher) and the
emulator's pods (``sim/wire.py``) all use the records declared here.

vLLM publishes one msgpack ``EventBatch`` per scheduler step: an array ``[ts, events,
data_parallel_rank]``. Since vLLM 0.24 each event is a map keyed by ``"type"``; up to 0.23 it is a
positional array ``[tag, field1, ...]`` in the same field order. Structs only ever gain fields
at the end, so a decoder must accept missing trailing optional fields and ignore unknown ones.

Block hashes are msgpack ints (unsigned, up to 2**64-1, any int width) or digest bytes (with
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``); bytes are reduced to their low 64 bits read
big-endian, exactly as vLLM converts them, so every decoded record carries int hashes.

Decoding is one C-level msgspec call per batch in the common case. Only when that fails (a bytes
hash, an unknown event type, a malformed event) is the batch decoded event by event, so that
the good events are kept and each bad one is rejected with a countable reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, TypeAlias

import msgspec

from kvaware_scorer.errors import EventDecodeError
from kvaware_scorer.keys import u64

__all__ = [
    "DECODE_ERRORS",
    "KNOWN_EVENT_TYPES",
    "LEGACY_FIELDS",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "DecodedBatch",
    "EventDecoder",
    "KVCacheEvent",
    "KVEventBatch",
    "WireBlockRemoved",
    "WireBlockStored",
    "WireEvent",
    "encode_batch",
    "encode_event",
    "event_fields",
]


#: An event-form block hash after decoding: unsigned 64-bit.
ExternalBlockHash: TypeAlias = Annotated[int, msgspec.Meta(ge=0)]
_HashBytes: TypeAlias = Annotated[bytes, msgspec.Meta(min_length=1)]
_AnyHash: TypeAlias = ExternalBlockHash | _HashBytes
#: Token ids as vLLM sends them (non-negative, 32-bit).
TokenId: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]
_NonNegative: TypeAlias = Annotated[int, msgspec.Meta(ge=0)]

#: The event type tags this decoder understands.
KNOWN_EVENT_TYPES: Final = frozenset({"BlockStored", "BlockRemoved", "AllBlocksCleared"})


def _low64(value: int | bytes) -> int:
    return value if isinstance(value, int) else u64(value)


class BlockStored(msgspec.Struct, tag=True, gc=False):
    """Blocks newly cached by a pod (vLLM's ``BlockStored``), fields in vLLM's wire order.

    Attributes:
        block_hashes: One hash per stored block (unsigned 64-bit).
        parent_block_hash: Hash of the block before ``block_hashes[0]``; None at block 0 and
            for offload placeholders.
        token_ids: Every token of the stored run (``len(block_hashes) * block_size`` for
            full-attention groups; empty for offload placeholders).
        block_size: Tokens per block of this KV-cache group (0 for offload placeholders).
        lora_id: Deprecated LoRA int id.
        medium: ``"GPU"``, ``"CPU"``, ``"STORAGE"`` or a connector's own string; None = unset.
        lora_name: LoRA adapter name, when the request used one.
        extra_keys: Per block: None or the untagged extra keys (LoRA name, multimodal
            ``[identifier, offset]`` entries, ``cache_salt`` on block 0, prompt-embeds digest).
        group_idx: KV-cache group of the blocks.
        kv_cache_spec_kind: The group's kind (``"full_attention"``, ``"sliding_window"``, ...).
        kv_cache_spec_sliding_window: The group's window, for sliding-window groups.
        locality: ``"LOCAL"`` / ``"REMOTE"`` (offload tiers).
        ownership: Secondary offload-tier id.
        session_id: The request's session id.
        lookahead_token_ids: EAGLE lookahead tokens hashed with each block.
    """

    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[TokenId]
    block_size: _NonNegative
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: list[Any] | None = None


class BlockRemoved(msgspec.Struct, tag=True, gc=False):
    """Blocks a pod evicted, one reference each (vLLM's ``BlockRemoved``).

    Attributes:
        block_hashes: Hashes of the removed blocks (unsigned 64-bit).
        medium: Tier the blocks were removed from; None = unset.
        group_idx: KV-cache group of the blocks.
        locality: ``"LOCAL"`` / ``"REMOTE"`` (offload tiers).
        ownership: Secondary offload-tier id.
    """

    block_hashes: list[ExternalBlockHash]
    medium: str | None = None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, gc=False):
    """The pod reset its prefix cache: every block it held is gone (vLLM's ``AllBlocksCleared``)."""


KVCacheEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, gc=False):
    """One published step: ``[ts, events, data_parallel_rank]`` (vLLM's ``KVEventBatch``).

    Attributes:
        ts: Publisher wall-clock time (seconds since the epoch).
        events: The step's events in generation order.
        data_parallel_rank: The publishing engine's DP rank (vLLM always fills it in).
    """

    ts: float
    events: list[KVCacheEvent]
    data_parallel_rank: _NonNegative | None = None


# -- decoding variants ------------------------------------------------------------------------
# NOTE: the public records take int hashes only, so the common case decodes in one C call with
# no Python per event. Subclasses accept bytes hashes and normalize them in __post_init__; the
# legacy (<= 0.23) subclasses read positional arrays. Every variant is an instance of the
# public record class, so consumers never see the difference.


class _BlockStoredAny(BlockStored, tag="BlockStored"):
    block_hashes: list[_AnyHash]  # type: ignore[assignment]
    parent_block_hash: _AnyHash | None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.block_hashes = [_low64(h) for h in self.block_hashes]
        if self.parent_block_hash is not None:
            self.parent_block_hash = _low64(self.parent_block_hash)


class _BlockRemovedAny(BlockRemoved, tag="BlockRemoved"):
    block_hashes: list[_AnyHash]  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.block_hashes = [_low64(h) for h in self.block_hashes]


class _LegacyBlockStored(BlockStored, tag="BlockStored", array_like=True):
    pass


class _LegacyBlockRemoved(BlockRemoved, tag="BlockRemoved", array_like=True):
    pass


class _LegacyAllBlocksCleared(AllBlocksCleared, tag="AllBlocksCleared", array_like=True):
    pass


class _LegacyBlockStoredAny(_BlockStoredAny, tag="BlockStored", array_like=True):
    pass


class _LegacyBlockRemovedAny(_BlockRemovedAny, tag="BlockRemoved", array_like=True):
    pass


_MapEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared
_MapEventAny: TypeAlias = _BlockStoredAny | _BlockRemovedAny | AllBlocksCleared
_LegacyEvent: TypeAlias = _LegacyBlockStored | _LegacyBlockRemoved | _LegacyAllBlocksCleared
_LegacyEventAny: TypeAlias = (
    _LegacyBlockStoredAny | _LegacyBlockRemovedAny | _LegacyAllBlocksCleared
)


class _LegacyBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[_LegacyEvent]
    data_parallel_rank: _NonNegative | None = None


class _RawBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: _NonNegative | None = None


@dataclass(slots=True)
class DecodedBatch:
    """A decoded payload: the usable events and a reason for each rejected one.

    Attributes:
        ts: Publisher timestamp.
        data_parallel_rank: DP rank (None when the batch did not carry one).
        events: Events that decoded, in order.
        rejected: One reason per event that was dropped (``unknown_event_type``,
            ``malformed_event``).
        legacy: Whether the events came in the positional-array form (vLLM <= 0.23).
    """

    ts: float
    data_parallel_rank: int | None
    events: list[KVCacheEvent]
    rejected: list[str] = field(default_factory=list)
    legacy: bool = False


# NOTE: every error the decoding library can raise on hostile bytes, whatever its version:
# DecodeError / ValidationError (msgspec >= 0.23 also for invalid UTF-8), UnicodeError and
# ValueError (older msgspec), RecursionError (a frame nested deeper than the interpreter's
# stack: one ~1 KB frame is enough), OverflowError / MemoryError (absurd lengths), TypeError
# and IndexError (from __post_init__ on odd values).
DECODE_ERRORS: Final = (
    msgspec.DecodeError,
    UnicodeError,
    ValueError,
    RecursionError,
    OverflowError,
    MemoryError,
    TypeError,
    IndexError,
)
_DECODE_ERRORS: Final = DECODE_ERRORS

_MAP_FIRST = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
_ARRAY_FIRST = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}


class EventDecoder:
    """Decodes payload frames into `DecodedBatch` records; one instance can be shared by threads."""

    def __init__(self) -> None:
        dec = msgspec.msgpack.Decoder
        self._fast = dec(KVEventBatch)
        self._fast_legacy = dec(_LegacyBatch)
        self._raw = dec(_RawBatch)
        self._map_event = dec(_MapEventAny)
        self._legacy_event = dec(_LegacyEventAny)
        self._generic = dec()

    def decode(self, payload: bytes | bytearray | memoryview) -> DecodedBatch:
        """Decode one payload frame.

        Raises:
            EventDecodeError: With reason ``decode_error`` when the frame is not a msgpack
                ``[ts, [events...], rank?]`` array at all (nothing in it can be used).
        """
        try:
            b = self._fast.decode(payload)
            return DecodedBatch(b.ts, b.data_parallel_rank, b.events)
        except _DECODE_ERRORS:
            pass
        try:
            lb = self._fast_legacy.decode(payload)
            return DecodedBatch(lb.ts, lb.data_parallel_rank, lb.events, legacy=True)  # type: ignore[arg-type]
        except _DECODE_ERRORS:
            pass
        return self._decode_slow(payload)

    def _decode_slow(self, payload: bytes | bytearray | memoryview) -> DecodedBatch:
        try:
            raw = self._raw.decode(payload)
        except _DECODE_ERRORS as exc:
            raise EventDecodeError("decode_error", str(exc)) from None
        events: list[KVCacheEvent] = []
        rejected: list[str] = []
        legacy = False
        for item in raw.events:
            data = bytes(item)
            first = data[0] if data else -1
            try:
                if first in _MAP_FIRST:
                    events.append(self._map_event.decode(data))
                    continue
                if first in _ARRAY_FIRST:
                    events.append(self._legacy_event.decode(data))
                    legacy = True
                    continue
            except _DECODE_ERRORS:
                pass
            rejected.append(self._reason(data))
        return DecodedBatch(raw.ts, raw.data_parallel_rank, events, rejected, legacy)

    def _reason(self, data: bytes) -> str:
        try:
            obj = self._generic.decode(data)
        except _DECODE_ERRORS:
            return "malformed_event"
        tag: Any = None
        if isinstance(obj, dict):
            tag = obj.get("type")
        elif isinstance(obj, list) and obj:
            tag = obj[0]
        if isinstance(tag, str) and tag not in KNOWN_EVENT_TYPES:
            return "unknown_event_type"
        return "malformed_event"


# -- encoding ---------------------------------------------------------------------------------
# NOTE: vLLM declares lora_id, medium and lora_name without defaults, so its omit_defaults
# encoder always writes them (nil when None) while it omits the later fields when None. The
# `Wire*` subclasses restate only that requiredness; every field is declared once, above. The
# legacy (<= 0.23) positional form is the first `LEGACY_FIELDS` fields of the same records.


class WireBlockStored(BlockStored, tag="BlockStored", omit_defaults=True):
    """`BlockStored` laid out exactly as vLLM encodes it (what the emulator publishes)."""

    lora_id: int | None
    medium: str | None
    lora_name: str | None


class WireBlockRemoved(BlockRemoved, tag="BlockRemoved", omit_defaults=True):
    """`BlockRemoved` laid out exactly as vLLM encodes it (what the emulator publishes)."""

    medium: str | None


#: Events as vLLM's publisher writes them; `AllBlocksCleared` has no field to lay out.
WireEvent: TypeAlias = WireBlockStored | WireBlockRemoved | AllBlocksCleared

#: Fields of each event in vLLM 0.23.0, the last positional (array) form; later fields are dropped.
LEGACY_FIELDS: Final = {"BlockStored": 11, "BlockRemoved": 3, "AllBlocksCleared": 0}

_WIRE: Final[dict[type[msgspec.Struct], type[msgspec.Struct]]] = {
    BlockStored: WireBlockStored,
    BlockRemoved: WireBlockRemoved,
    AllBlocksCleared: AllBlocksCleared,
}
_WIRE_TYPES: Final = frozenset(_WIRE.values())


class _WireBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


def encode_event(event: KVCacheEvent, legacy: bool = False) -> msgspec.Struct | list[Any]:
    """The wire form of one event, laid out as vLLM's encoder does.

    Map form (vLLM >= 0.24): ``"type"`` first, required fields always present (nil when None),
    optional fields only when set. Legacy form (<= 0.23): a positional array ``[tag, ...]``
    with every field of vLLM 0.23.0's struct (later fields are dropped).
    """
    base = next((b for b in _WIRE if isinstance(event, b)), None)
    if base is None:
        raise TypeError(f"not a KV-cache event: {type(event).__name__}")
    if legacy:
        tag = base.__struct_config__.tag
        count = LEGACY_FIELDS[str(tag)]
        return [tag, *(getattr(event, f) for f in base.__struct_fields__[:count])]
    wire = _WIRE[base]
    if type(event) is wire:
        return event
    return wire(**{f: getattr(event, f) for f in wire.__struct_fields__})


def encode_batch(
    events: Iterable[KVCacheEvent],
    ts: float | None = None,
    data_parallel_rank: int | None = 0,
    *,
    legacy: bool = False,
    encoder: msgspec.msgpack.Encoder | None = None,
) -> bytes:
    """Encode a batch byte for byte as vLLM's publisher does (``[ts, events, rank]``).

    Args:
        events: The events, in order (`Wire*` events are written as they are, others are
            laid out first).
        ts: Timestamp; now when None.
        data_parallel_rank: DP rank (vLLM's publisher always sets one; None encodes nil).
        legacy: Positional-array events (vLLM <= 0.23) instead of maps.
        encoder: A reusable msgpack encoder (msgspec encoders are not thread-safe).
    """
    enc = encoder or msgspec.msgpack.Encoder()
    body: list[Any] = list(events)
    # NOTE: the emulator's events are already laid out (its hot path): encoded as they are.
    if legacy or not _WIRE_TYPES.issuperset(map(type, body)):
        body = [encode_event(e, legacy) for e in body]
    stamp = float(time.time() if ts is None else ts)
    return enc.encode(_WireBatch(stamp, body, data_parallel_rank))


def event_fields(event: KVCacheEvent) -> dict[str, Any]:
    """Every field of an event by name, plus its ``type`` (for comparisons and logs)."""
    out: dict[str, Any] = {"type": type(event).__struct_config__.tag}
    for name in event.__struct_fields__:
        out[name] = getattr(event, name)
    return out
