"""The emulator's KV-event output: vLLM's records and encoder, plus SGLang's form of them.

The wire schema lives in one place, `kvaware_scorer.events.decode`; this module only names
what the emulated engine emits. Its pods build `BlockStored` / `BlockRemoved` as vLLM lays them
out (``events.decode.WireBlockStored`` / ``WireBlockRemoved``: lora_id, medium and lora_name
always written) and encode them with the same `encode_batch` the tests use, so the bytes are
identical to vLLM's ``ZmqEventPublisher`` (tests re-encode captured frames byte for byte).

NOTE: the emulator has no encoder of its own on purpose. The independent oracle for both the
decoder and the encoder is the set of frames captured from vLLM itself, not a second copy of
the schema: a second copy only doubles the places a new vLLM field must be added.

A GPU ``BlockStored`` from vLLM's block pool carries ``extra_keys`` (one entry per block, nil
without LoRA or salt), ``group_idx`` and ``kv_cache_spec_kind``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from kvaware_scorer.events.decode import AllBlocksCleared, encode_batch
from kvaware_scorer.events.decode import WireBlockRemoved as BlockRemoved
from kvaware_scorer.events.decode import WireBlockStored as BlockStored
from kvaware_scorer.events.decode import WireEvent as KVEvent

__all__ = [
    "MEDIUM_GPU",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EventEncoder",
    "KVEvent",
    "SGLangEventEncoder",
    "event_extra_keys",
]

MEDIUM_GPU = "GPU"


def event_extra_keys(
    num_blocks: int, first_block_index: int, lora_name: str | None, cache_salt: str | None
) -> list[list[Any] | None]:
    """vLLM's untagged event extra keys: the LoRA name on every block, the salt on block 0."""
    if not lora_name and not cache_salt:
        return [None] * num_blocks
    out: list[list[Any] | None] = []
    for i in range(num_blocks):
        keys: list[Any] = [lora_name] if lora_name else []
        if cache_salt and first_block_index + i == 0:
            keys.append(cache_salt)
        out.append(keys or None)
    return out


class EventEncoder:
    """Encodes event batches to vLLM's payload bytes with `encode_batch` and an encoder of its
    own (msgspec encoders are not thread-safe: one per publishing thread)."""

    def __init__(self) -> None:
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(list[Any])

    def encode(
        self, ts: float, events: Sequence[KVEvent], data_parallel_rank: int | None = 0
    ) -> bytes:
        """One payload frame: ``[ts, [events...], data_parallel_rank]``.

        Args:
            ts: Wall-clock seconds (vLLM stamps ``time.time()`` when it publishes).
            events: The step's events in generation order.
            data_parallel_rank: The publisher's DP rank (vLLM always fills it: 0 without DP).
        """
        return encode_batch(events, ts, data_parallel_rank, encoder=self._enc)

    def decode(self, payload: bytes) -> list[Any]:
        """Plain msgpack view of a payload (for tests and debugging)."""
        out: list[Any] = self._dec.decode(payload)
        return out


def _signed64(value: int | bytes) -> int:
    """A vLLM hash as an SGLang event hash: a signed int64 (bytes: their first 8, as SGLang
    reads its SHA-256 digests)."""
    raw = value[:8] if isinstance(value, bytes) else (value & ((1 << 64) - 1)).to_bytes(8, "big")
    return int.from_bytes(raw.rjust(8, b"\0"), "big", signed=True)


class SGLangEventEncoder(EventEncoder):
    """Encodes the emulator's events as an SGLang >= 0.5.20 publisher sends them.

    Events become maps in SGLang's field order with signed int64 hashes and ``medium`` always
    set; the batch's rank is ``attn_dp_rank``; the first batch of a publisher starts with
    ``AllBlocksCleared`` (SGLang queues one when its cache is built). The hashes stay the
    emulated vLLM engine's, reinterpreted as signed: opaque ids to any consumer, which derives
    keys from token ids.
    """

    def __init__(self) -> None:
        super().__init__()
        self._started = False

    def encode(
        self, ts: float, events: Sequence[KVEvent], data_parallel_rank: int | None = 0
    ) -> bytes:
        out: list[dict[str, Any]] = []
        if not self._started:
            self._started = True
            out.append({"type": "AllBlocksCleared"})
        for ev in events:
            if isinstance(ev, BlockStored):
                m: dict[str, Any] = {
                    "type": "BlockStored",
                    "block_hashes": [_signed64(h) for h in ev.block_hashes],
                    "parent_block_hash": None
                    if ev.parent_block_hash is None
                    else _signed64(ev.parent_block_hash),
                    "token_ids": list(ev.token_ids),
                    "block_size": ev.block_size,
                    "lora_id": None,
                    "medium": ev.medium or MEDIUM_GPU,
                }
                salt = _salt(ev.extra_keys, ev.lora_name)
                if salt is not None:
                    m["cache_salt"] = salt
                if ev.lora_name:
                    m["lora_name"] = ev.lora_name
                out.append(m)
            elif isinstance(ev, BlockRemoved):
                out.append(
                    {
                        "type": "BlockRemoved",
                        "block_hashes": [_signed64(h) for h in ev.block_hashes],
                        "medium": ev.medium or MEDIUM_GPU,
                    }
                )
            else:
                out.append({"type": "AllBlocksCleared"})
        payload: bytes = self._enc.encode([float(ts), out, data_parallel_rank])
        return payload


def _salt(extra: list[list[Any] | None] | None, lora: str | None) -> str | None:
    if not extra or not extra[0]:
        return None
    for x in extra[0]:
        if isinstance(x, str) and x != lora:
            return x
    return None
