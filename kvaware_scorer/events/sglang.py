"""SGLang's KV-event wire format, decoded into the records the ingestor applies.

SGLang publishes the same three ZMQ frames as vLLM (``topic``, 8-byte big-endian seq, msgpack
payload), but its payload differs in ways that break a vLLM decoder:

* Block hashes are the first 8 bytes of a SHA-256 chain read as a **signed** int64. They are
  reduced to unsigned 64 bits here; they never equal vLLM's hashes and are never used as keys
  (keys are derived from token ids, ``derived`` key mode).
* Events are msgpack maps since 0.5.20 and positional arrays before (6 to 8 elements; the 8th,
  0.5.18-0.5.19 only, is a ``{"cache_salt": ...}`` map). The batch is ``[ts, events,
  attn_dp_rank]`` with the rank omitted (<= 0.5.15) or nil (>= 0.5.17).
* ``token_ids`` are ``[t_i, t_i+1]`` pairs under EAGLE (the first of each pair is the prompt's
  token) and may exceed 32 bits for image pads (0.5.23). A block holding such a pad is keyed
  with its pads as content, so it never shares a key with a text block.
* The page size defaults to **1 token**. Pages smaller than the index's block size are
  re-chunked: the tokens of a partial chunk are carried from one store to the next through
  the parent chain (`carry`), and each complete chunk is held by the hash of the page that
  completes it. SGLang evicts whole leaves, tail first, so removing that page is exactly when
  the chunk stops being complete.
* ``CPU_PINNED`` (HiCache) is the host tier (``cpu``): one hash can be held on both tiers.

The carry map is keyed by engine hash. An SGLang hash names a whole token prefix (salt and
namespace included), so one map serves every pod and stream; it is an LRU bounded by
``carry_size`` entries. A store whose parent fell out of it and is not itself a chunk boundary
reaches the ingestor with an unknown parent and is counted as ``orphaned_parent``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Final

import msgspec

from kvaware_scorer.errors import EventDecodeError
from kvaware_scorer.events.decode import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodedBatch,
    KVCacheEvent,
)

__all__ = ["SGLANG_TIERS", "SGLangEventDecoder"]

_U64: Final = (1 << 64) - 1
_I64_MIN: Final = -(1 << 63)
_U32: Final = 0xFFFFFFFF

#: SGLang's storage media as index tiers (``GPU`` and HiCache's host copy).
SGLANG_TIERS: Final = {"GPU": "gpu", "CPU_PINNED": "cpu", "CPU": "cpu"}

# NOTE: msgspec raises DecodeError for malformed msgpack (and for invalid UTF-8 since 0.23),
# ValueError/UnicodeDecodeError before, and RecursionError-like errors on deep nesting.
_DECODE_ERRORS: Final = (msgspec.DecodeError, ValueError, RecursionError)

#: Default bound of the carry map (entries; one per page of a partial chunk at most).
DEFAULT_CARRY_SIZE: Final = 1 << 17


class _Malformed(Exception):
    pass


def _hash(value: Any) -> int:
    if type(value) is not int or not _I64_MIN <= value <= _U64:
        raise _Malformed
    return value & _U64


def _hashes(value: Any) -> list[int]:
    if not isinstance(value, list) or not value:
        raise _Malformed
    return [_hash(v) for v in value]


def _tokens(value: Any) -> list[int]:
    if not isinstance(value, list):
        raise _Malformed
    out: list[int] = []
    for t in value:
        if isinstance(t, list):  # an EAGLE bigram [t_i, t_i+1]
            if len(t) != 2:
                raise _Malformed
            t = t[0]
        if type(t) is not int or not 0 <= t <= _U64:
            raise _Malformed
        out.append(t)
    return out


def _opt_str(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise _Malformed


class SGLangEventDecoder:
    """Decodes SGLang payload frames into `DecodedBatch` records keyed at `block_size` tokens.

    Args:
        block_size: The index's block size (tokens per key).
        carry_size: Most engine hashes remembered with the partial chunk that ends at them
            (an LRU; see the module notes).

    Thread-safe: the carry map is guarded by a lock.
    """

    def __init__(self, block_size: int, carry_size: int = DEFAULT_CARRY_SIZE) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self.carry_size = max(1, carry_size)
        # engine hash -> (hash holding the last complete chunk before it, tokens after that)
        self._carry: OrderedDict[int, tuple[int | None, tuple[int, ...]]] = OrderedDict()
        self._lock = threading.Lock()
        self._generic = msgspec.msgpack.Decoder()

    def decode(self, payload: bytes | bytearray | memoryview) -> DecodedBatch:
        """Decode one payload frame.

        Raises:
            EventDecodeError: With reason ``decode_error`` when the frame is not a msgpack
                ``[ts, [events...], rank?]`` array.
        """
        try:
            obj = self._generic.decode(payload)
        except _DECODE_ERRORS as exc:
            raise EventDecodeError("decode_error", str(exc)) from None
        if not isinstance(obj, list) or not 2 <= len(obj) <= 3:
            raise EventDecodeError("decode_error", "not an [ts, events, rank] array")
        ts, raw = obj[0], obj[1]
        rank = obj[2] if len(obj) == 3 else None
        if not isinstance(ts, int | float) or not isinstance(raw, list):
            raise EventDecodeError("decode_error", "bad batch header")
        if rank is not None and (type(rank) is not int or rank < 0):
            raise EventDecodeError("decode_error", "bad attn_dp_rank")
        events: list[KVCacheEvent] = []
        rejected: list[str] = []
        legacy = False
        for item in raw:
            try:
                if isinstance(item, dict):
                    ev = self._event(item.get("type"), item, None)
                elif isinstance(item, list) and item:
                    legacy = True
                    ev = self._event(item[0], None, item)
                else:
                    raise _Malformed
            except _Malformed:
                rejected.append("malformed_event")
                continue
            except _UnknownType:
                rejected.append("unknown_event_type")
                continue
            if ev is not None:
                events.append(ev)
        return DecodedBatch(float(ts), rank, events, rejected, legacy)

    # -- events ------------------------------------------------------------------------------

    def _event(
        self, tag: Any, m: dict[str, Any] | None, a: list[Any] | None
    ) -> KVCacheEvent | None:
        def field(name: str, pos: int) -> Any:
            if m is not None:
                return m.get(name)
            assert a is not None
            return a[pos] if pos < len(a) else None

        if tag == "BlockStored":
            salt = field("cache_salt", 99)
            if a is not None and len(a) > 7 and isinstance(a[7], dict):
                salt = a[7].get("cache_salt")  # 0.5.18-0.5.19 BlockStoredWithMetadata
            bs = field("block_size", 4)
            if type(bs) is not int or bs < 1:
                raise _Malformed
            hashes = _hashes(field("block_hashes", 1))
            parent_raw = field("parent_block_hash", 2)
            parent = None if parent_raw is None else _hash(parent_raw)
            tokens = _tokens(field("token_ids", 3))
            if len(tokens) != len(hashes) * bs:
                raise _Malformed
            return self._stored(
                hashes,
                parent,
                tokens,
                bs,
                _opt_str(field("medium", 6)),
                _opt_str(field("lora_name", 99)),
                _opt_str(salt),
                _opt_str(field("session_id", 99)),
            )
        if tag == "BlockRemoved":
            hashes = _hashes(field("block_hashes", 1))
            medium = _opt_str(field("medium", 2))
            kept = self._removable(hashes)
            if not kept:
                return None
            return BlockRemoved(kept, medium=_medium(medium))
        if tag == "AllBlocksCleared":
            return AllBlocksCleared()
        if isinstance(tag, str):
            raise _UnknownType
        raise _Malformed

    def _stored(
        self,
        hashes: list[int],
        parent: int | None,
        tokens: list[int],
        bs: int,
        medium: str | None,
        lora: str | None,
        salt: str | None,
        session: str | None,
    ) -> BlockStored | None:
        bsz = self.block_size
        if bs % bsz == 0:
            out_hashes, out_tokens, out_parent, out_bs = hashes, tokens, parent, bs
        elif bs < bsz:
            rechunked = self._rechunk(hashes, parent, tokens, bs)
            if rechunked is None:
                return None
            out_hashes, out_tokens, out_parent = rechunked
            out_bs = bsz
        else:
            # NOTE: a page larger than the block size and not a multiple of it: the ingestor
            # counts it as block_size_mismatch.
            out_hashes, out_tokens, out_parent, out_bs = hashes, tokens, parent, bs
        extra = _extra_keys(out_tokens, out_bs, lora, salt if out_parent is None else None)
        if extra is not None:
            out_tokens = [t & _U32 for t in out_tokens]
        return BlockStored(
            block_hashes=out_hashes,
            parent_block_hash=out_parent,
            token_ids=out_tokens,
            block_size=out_bs,
            medium=_medium(medium),
            lora_name=lora,
            extra_keys=extra,
            session_id=session,
        )

    def _rechunk(
        self, hashes: list[int], parent: int | None, tokens: list[int], bs: int
    ) -> tuple[list[int], list[int], int | None] | None:
        """Pages of `bs` tokens as chunks of the index's block size; None when no chunk ends."""
        bsz = self.block_size
        carry = self._carry
        with self._lock:
            if parent is None:
                boundary: int | None = None
                cur: list[int] = []
            else:
                state = carry.get(parent)
                if state is None:
                    boundary, cur = parent, []  # a chunk boundary (or unknown: orphaned)
                else:
                    carry.move_to_end(parent)
                    boundary, cur = state[0], list(state[1])
            first_parent = boundary
            out_hashes: list[int] = []
            out_tokens: list[int] = []
            for i, h in enumerate(hashes):
                cur.extend(tokens[i * bs : (i + 1) * bs])
                if len(cur) >= bsz:
                    out_tokens.extend(cur[:bsz])
                    out_hashes.append(h)
                    cur = cur[bsz:]
                    boundary = h
                carry[h] = (boundary, tuple(cur))
                carry.move_to_end(h)
            while len(carry) > self.carry_size:
                carry.popitem(last=False)
        if not out_hashes:
            return None
        return out_hashes, out_tokens, first_parent

    def _removable(self, hashes: list[int]) -> list[int]:
        """The removed hashes that can hold a key (a page that completed a chunk, or unknown)."""
        if not self._carry:
            return hashes
        with self._lock:
            get = self._carry.get
            out = []
            for h in hashes:
                state = get(h)
                if state is None or state[0] == h:
                    out.append(h)
            return out


class _UnknownType(Exception):
    pass


def _medium(medium: str | None) -> str | None:
    if medium is None:
        return None
    return SGLANG_TIERS.get(medium, medium)


def _extra_keys(tokens: list[int], bs: int, lora: str | None, salt: str | None) -> list[Any] | None:
    """vLLM-shaped extra keys: the salt on block 0 (seeds the root key), and wide image-pad
    tokens as a block's content (so the block never shares a key with text)."""
    extra: list[Any] | None = None
    n = len(tokens) // bs if bs else 0
    if salt is not None and n:
        extra = [None] * n
        extra[0] = [lora, salt] if lora is not None else [salt]
    for i in range(n):
        run = tokens[i * bs : (i + 1) * bs]
        wide = [t for t in run if t > _U32]
        if not wide:
            continue
        if extra is None:
            extra = [None] * n
        entry = extra[i] if isinstance(extra[i], list) else []
        extra[i] = [*entry, ["sglang_wide_tokens", *wide]]
    return extra
