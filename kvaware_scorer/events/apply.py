"""`BatchApplier`: applies one stream's decoded batches to the index (keys, references, tiers).

Given a `StreamState` and a `DecodedBatch`, it walks the batch's events in order and queues
their writes on a `BatchWriter` (one ``index.batch()`` per batch):

* *Stores*: in ``derived`` key mode each stored block's key is chained from its parent's key
  (from the stream's ``recent`` keys, else resolved through the index's engine-hash map) over
  the block's tokens, with the content extra keys (multimodal inputs, ...) mixed in; a
  parent-less run starts at the root of (model or LoRA, cache_salt). A block whose parent is
  unknown is never keyed as if it started a prompt: it is counted as orphaned and left out.
  In ``vllm`` mode the engine hash is the key.
* *Removals*: straight to the index for a pod's only stream (the index's references are the
  stream's); against the stream's own ``held`` counts when other DP ranks of the pod stream.
* *Offload placeholders* (stores without tokens): add a tier to blocks the pod holds.
* *AllBlocksCleared*: handed to ``on_clear`` (the stream tracker resets the stream).

Only the KV-cache group of full attention is indexed (the prefix a request can hit); tiers
beyond the index's bound are refused up front. Bad events are dropped and counted by reason,
never raised. This module knows nothing of sequence numbers, replays or transports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

import msgspec
import xxhash

from kvaware_scorer.errors import KVAwareError
from kvaware_scorer.events.decode import AllBlocksCleared, BlockRemoved, BlockStored, DecodedBatch
from kvaware_scorer.events.state import RECENT, StreamState
from kvaware_scorer.events.writer import BACKEND_ERRORS, BatchWriter, Counters, WriteCounter
from kvaware_scorer.index.base import MAX_TIERS, normalize_medium
from kvaware_scorer.keys import DerivedKeyer, EngineHash

if TYPE_CHECKING:
    from kvaware_scorer.index.base import IndexStats, KVBlockIndex
    from kvaware_scorer.metrics import Metrics

__all__ = ["FULL_ATTENTION_KINDS", "BatchApplier", "index_stats", "purge_index"]

logger = logging.getLogger(__name__)

#: KV-cache group kinds whose blocks are indexed (the prefix a request can hit).
FULL_ATTENTION_KINDS: Final = frozenset({"full_attention", "mla_attention", "sink_full_attention"})

#: Never equal to a decoded medium.
_UNSET: Final = object()

#: Media remembered by the medium -> tier name cache.
_TIER_CACHE: Final = 1024


def purge_index(index: KVBlockIndex, metrics: Metrics, pod: str, reason: str) -> int:
    """Drop every index entry of `pod`, counting the purge by `reason`; returns the entries
    dropped (0 when the index failed, which is counted and logged, never raised)."""
    metrics.purges.labels(reason).inc()
    try:
        return index.purge(pod)
    except (KVAwareError, OSError) as exc:
        metrics.backend_errors.labels("purge").inc()
        logger.warning("purge of %s failed: %s", pod, exc)
        return 0


def index_stats(index: KVBlockIndex, metrics: Metrics) -> IndexStats:
    """The index's size and counters; also sets the size gauges from them."""
    st = index.stats()
    metrics.index_entries.set(st.entries)
    metrics.index_blocks.set(st.blocks)
    metrics.index_pods.set(st.pods)
    metrics.index_evictions.set(st.evictions)
    return st


def _salt_of(entry: Any, lora: str | None) -> str | None:
    """The cache_salt in block 0's untagged extra keys (after the LoRA name, if any)."""
    if not isinstance(entry, list) or not entry:
        return None
    items = entry[1:] if lora is not None and entry[0] == lora else entry
    for x in items:
        if isinstance(x, str):
            return x
    return None


def _release(held: dict[int, int], hashes: list[int], gone: list[int]) -> int:
    """Take one reference of each of `hashes` from a stream's `held` counts, appending the
    released ones to `gone`; returns how many the stream did not hold."""
    unknown = 0
    get = held.get
    for h in hashes:
        c = get(h)
        if c is None:
            unknown += 1
        elif c == 1:
            del held[h]
            gone.append(h)
        else:
            held[h] = c - 1
            gone.append(h)
    return unknown


class BatchApplier:
    """Applies decoded batches of a stream to `index`, in event order (see the module doc).

    Args:
        index: Where the writes go.
        keyer: The key maker in ``derived`` key mode; None in ``vllm`` mode (engine hashes
            are the keys).
        block_size: The index's block size in tokens (a store's blocks are re-chunked to it).
        tier_names: Tier names the index knows already (with `default_tier`).
        default_tier: The tier of events naming no medium.
        metrics: Where events, drops and writes are counted.

    Attributes:
        max_event_tokens: Most token ids one BlockStored may carry (a model's context is far
            below the default, 2**20); beyond it the event is dropped (``too_many_tokens``),
            so one event can never make more than ``max_event_tokens / block_size`` keys.
        on_clear: Called for an AllBlocksCleared with the stream's state (after the writes
            before it were sent); returns the state the rest of the batch applies to. The
            stream tracker resets the stream there.
    """

    max_event_tokens: int = 1 << 20

    def __init__(
        self,
        index: KVBlockIndex,
        keyer: DerivedKeyer | None,
        block_size: int,
        tier_names: Iterable[str],
        default_tier: str,
        metrics: Metrics,
    ) -> None:
        self.index = index
        self.metrics = metrics
        self.block_size = block_size
        self.default_tier = default_tier
        self._keyer = keyer
        self._encoder = msgspec.msgpack.Encoder()
        self.dropped = Counters(metrics.dropped)
        self.skipped = Counters(metrics.blocks_skipped)
        self._events = Counters(metrics.events)
        self._batches = Counters(metrics.event_batches)
        self._count = WriteCounter(metrics, self.skipped)
        self.on_clear: Callable[[StreamState], StreamState] = lambda st: st
        self._tiers: dict[str | None, str] = {}
        # NOTE: the index keeps at most MAX_TIERS tiers; an event naming one more is refused
        # up front (bad_tier) instead of failing half-applied.
        self._tier_names: set[str] = {default_tier, *tier_names}

    def writer(self, pod: str) -> BatchWriter:
        """A new batch of writes for `pod`."""
        return BatchWriter(self.index, pod, self._count)

    def tier(self, medium: str | None) -> str | None:
        """The tier name of `medium`; None when it would be a tier beyond the index's bound."""
        name = self._tiers.get(medium)
        if name is None:
            name = normalize_medium(medium, self.default_tier)
            if name not in self._tier_names:
                if len(self._tier_names) >= MAX_TIERS:
                    return None
                self._tier_names.add(name)
            if len(self._tiers) < _TIER_CACHE:
                self._tiers[medium] = name
        return name

    def apply(self, st: StreamState, batch: DecodedBatch, source: str) -> StreamState:
        """Apply `batch`'s events to the index in order; `source` labels the batch count
        (``live``, ``replay``, ``unsequenced``). Returns the stream's state afterwards (a new
        one after an AllBlocksCleared).

        NOTE: kept in one piece: it is the per-event loop of the hot path, where a call per
        event would cost more than the rest of a removal's handling.
        """
        self._batches[source].inc()
        st.batches += 1
        for reason in batch.rejected:
            self.dropped[reason].inc()
            logger.debug("dropped an event from %s: %s", st.pod, reason)
        w = BatchWriter(self.index, st.pod, self._count)
        n_removed = n_stored = unknown = 0
        # NOTE: removals are the most frequent events (one hash each, as vLLM evicts); the
        # loop keeps them on locals and hands them to the writer once per run. A pod's only
        # stream hands them over as they are (the index counts the unknown ones); a stream
        # sharing its pod with other ranks removes only what it holds itself.
        gone: list[int] = []
        gone_tier = ""
        last_medium: object = _UNSET  # the medium of the removals in `gone`
        tier: str | None = None
        shared = st.held is not None
        held: dict[int, int] | None = None
        main = 0 if st.main_group is None else st.main_group
        for ev in batch.events:
            cls = ev.__class__
            if cls is BlockRemoved or (cls is not BlockStored and isinstance(ev, BlockRemoved)):
                rm: BlockRemoved = ev  # type: ignore[assignment]
                n_removed += 1
                g = rm.group_idx
                medium = rm.medium
                if (g == main or g is None) and medium == last_medium and not shared:
                    gone += rm.block_hashes  # the hot path: one more eviction of the run
                    continue
                if g is not None and g != main:
                    self.skipped["kv_group"].inc(len(rm.block_hashes))
                    continue
                if medium != last_medium:
                    last_medium = medium
                    tier = self.tier(medium)
                    if gone and tier != gone_tier:
                        w.remove(gone_tier, gone, not shared)
                        gone = []
                    if tier is not None:
                        gone_tier = tier
                        if shared:
                            held = st.held.get(tier)  # type: ignore[union-attr]
                if tier is None:
                    last_medium = _UNSET  # NOTE: keeps a refused medium off the hot path
                    self.dropped["bad_tier"].inc()
                    n_removed -= 1
                    continue
                if not shared:
                    gone += rm.block_hashes
                    continue
                if held is None:
                    unknown += len(rm.block_hashes)
                else:
                    unknown += _release(held, rm.block_hashes, gone)
                continue
            last_medium = _UNSET  # a store may create this stream's dict for the tier
            if gone:
                w.remove(gone_tier, gone, not shared)
                gone = []
            if cls is BlockStored or isinstance(ev, BlockStored):
                n_stored += self._store(st, ev, w)  # type: ignore[arg-type]
                main = 0 if st.main_group is None else st.main_group
            elif isinstance(ev, AllBlocksCleared):
                w.flush()
                self._events["AllBlocksCleared"].inc()
                st = self.on_clear(st)
                w = self.writer(st.pod)
                shared = st.held is not None
                main = 0 if st.main_group is None else st.main_group
        if gone:
            w.remove(gone_tier, gone, not shared)
        w.flush()
        if n_removed:
            self._events["BlockRemoved"].inc(n_removed)
        if n_stored:
            self._events["BlockStored"].inc(n_stored)
        if unknown:
            self.skipped["unknown_block"].inc(unknown)
        return st

    def _group_ok(self, st: StreamState, group: int | None, kind: str | None) -> bool:
        if kind is not None and kind != "unknown":
            if kind not in FULL_ATTENTION_KINDS:
                return False
            if st.main_group is None:
                st.main_group = group
                return True
            return group == st.main_group
        # NOTE: no kind: vLLM < 0.24, or an offload placeholder; "unknown": a spec vLLM does not
        # classify (e.g. a platform plugin's own attention spec, the only group of its model).
        # Group 0 is vLLM's first (attention) group unless a full-attention group was learned.
        if group is None:
            return True
        return group == (0 if st.main_group is None else st.main_group)

    def _store(self, st: StreamState, ev: BlockStored, w: BatchWriter) -> bool:
        """Apply one store; False when it was dropped (and counted as such).

        NOTE: kept in one piece, over the usual function length: it runs once per BlockStored,
        the second most frequent event, and a call per store costs more than its checks. The
        checks share locals, and in ``derived`` mode the keys are chained here (a continuation
        of this stream's last store finds its parent's key in ``recent``); only the rare cases
        (a root, a parent resolved through the index, content extra keys) call out.
        """
        hashes = ev.block_hashes
        n = len(hashes)
        group = ev.group_idx
        kind = ev.kv_cache_spec_kind
        if (
            group != st.main_group or kind != "full_attention" or group is None
        ) and not self._group_ok(st, group, kind):
            self.skipped["kv_group"].inc(n)
            return True
        medium = ev.medium
        tier = self._tiers.get(medium) or self.tier(medium)
        if tier is None:
            self._drop("bad_tier", st.pod, ev)
            return False
        toks = ev.token_ids
        if not toks:
            return self._placeholder(st, hashes, tier, w)
        bs = ev.block_size
        n_toks = len(toks)
        if n_toks > self.max_event_tokens or bs <= 0 or n_toks != n * bs:
            too_many = n_toks > self.max_event_tokens
            self._drop("too_many_tokens" if too_many else "token_count_mismatch", st.pod, ev)
            return False
        bsz = self.block_size
        keyer = self._keyer
        parent = ev.parent_block_hash
        ehs: list[int] | None
        if keyer is None:
            if bs != bsz:
                self._drop("block_size_mismatch", st.pod, ev)
                return False
            keys = hashes
            ehs = None
            per = 1
        else:
            if bs == bsz:
                per = 1
            elif bs % bsz:
                self._drop("block_size_mismatch", st.pod, ev)
                return False
            else:
                per = bs // bsz
            pkey = None if parent is None else st.recent.get(parent)
            if pkey is None:
                pkey = self._parent_key(st, ev, keyer, w)
                if pkey is None:
                    return False
            extra = ev.extra_keys
            content = (
                self._content(extra, ev.lora_name, parent is None)
                if extra and extra.count(None) != len(extra)
                else None
            )
            if content is None:
                keys = keyer.chain(pkey, toks, bsz)
            else:
                keys = self._chain_mixed(keyer, pkey, toks, bs, content)
            recent = st.recent
            recent[hashes[-1]] = keys[-1]
            if len(recent) >= RECENT:
                st.recent_old = recent
                st.recent = {}
            ehs = hashes if per == 1 else [h for h in hashes for _ in range(per)]
        if st.held is None:
            if parent is None or st.merging:
                w.add_new(tier, keys, ehs, n)
            else:
                w.add(tier, keys, ehs, n, per)
            return True
        self._store_held(st, tier, hashes, keys, ehs, per, parent is None, w)
        return True

    def _parent_key(
        self, st: StreamState, ev: BlockStored, keyer: DerivedKeyer, w: BatchWriter
    ) -> int | None:
        """The key `ev`'s first block chains from: the root of its namespace (model or LoRA,
        cache_salt) for a parent-less store, else its parent's key (the stream's recent keys,
        else the index's); None when there is none (dropped and counted)."""
        pod = st.pod
        parent = ev.parent_block_hash
        if parent is None:
            lora = ev.lora_name
            space = lora
            if space is None and ev.lora_id is not None:
                # NOTE: vLLM 0.11 names the adapter by its int id only (no lora_name): its
                # blocks are hashed with the adapter, so they are keyed apart from the
                # model's (no request names this namespace: misses, never stale hits).
                space = f"\x00lora_id\x00{ev.lora_id}\x00{st.model or ''}"
            if space is None and not st.model:
                self._drop("no_model", pod, ev)
                return None
            extra = ev.extra_keys
            salt = _salt_of(extra[0], lora) if extra else None
            return keyer.root(st.model or "", space, salt)
        found = st.recent.get(parent)
        if found is None:
            found = st.recent_old.get(parent)
            if found is None:
                try:
                    found = w.resolve(parent)
                except BACKEND_ERRORS as exc:
                    self.metrics.backend_errors.labels("ingest").inc()
                    logger.warning("resolving a parent on %s failed: %s", pod, exc)
                    self._drop("backend_error", pod, ev)
                    return None
                if found is None:
                    self.metrics.orphaned_blocks.inc(len(ev.block_hashes))
                    self._drop("orphaned_parent", pod, ev)
                    return None
            st.remember(parent, found)
        return found

    def _store_held(
        self,
        st: StreamState,
        tier: str,
        hashes: list[int],
        keys: list[int],
        ehs: list[int] | None,
        per: int,
        at_root: bool,
        w: BatchWriter,
    ) -> None:
        """A store of a stream that shares its pod with other DP ranks: the stream counts its
        own references of the blocks too."""
        assert st.held is not None
        held = st.held.get(tier)
        if held is None:
            held = st.held[tier] = {}
        n = len(hashes)
        fresh = dict.fromkeys(hashes, 1)
        if len(fresh) == n and held.keys().isdisjoint(fresh):
            held.update(fresh)  # the common case: new blocks, no duplicates
        else:
            if at_root:
                # NOTE: a parent-less store of blocks this stream already holds re-announces
                # prefix-cache hits (kv_cache_report_mode=full): same physical blocks, so no
                # new reference (else the later single BlockRemoved would leave a stale entry).
                keep = [i for i, h in enumerate(hashes) if h not in held]
                if len(keep) < n:
                    self.skipped["reannounced"].inc(n - len(keep))
                    if not keep:
                        return
                    hashes = [hashes[i] for i in keep]
                    keys = [keys[i * per + j] for i in keep for j in range(per)]
                    if ehs is not None:
                        ehs = [h for h in hashes for _ in range(per)]
                    n = len(hashes)
            for h in hashes:
                held[h] = held.get(h, 0) + 1
        w.add(tier, keys, ehs, n, per)

    def _placeholder(self, st: StreamState, hashes: list[int], tier: str, w: BatchWriter) -> bool:
        """An offload placeholder (no tokens): add `tier` to blocks the pod already holds."""
        held_tiers = st.held
        if held_tiers is None:
            if st.merging:
                # NOTE: may have been applied already; a tier counted twice would stay
                self.skipped["rejoin"].inc(len(hashes))
                return True
            w.add_tier(tier, list(hashes))
            return True
        # NOTE: several ranks share the pod: count the tier for this rank only where the pod
        # knows the block.
        pod = st.pod
        try:
            if w.pending:
                w.flush()
            resolve = self.index.resolve
            known = [h for h in hashes if resolve(pod, EngineHash(h)) is not None]
        except BACKEND_ERRORS as exc:
            self.metrics.backend_errors.labels("ingest").inc()
            logger.warning("offload store for %s failed: %s", pod, exc)
            self.dropped["backend_error"].inc()
            return False
        if len(known) < len(hashes):
            self.skipped["unknown_block"].inc(len(hashes) - len(known))
        if not known:
            return True
        w.add_tier(tier, known)
        held = held_tiers.get(tier)
        if held is None:
            held = held_tiers[tier] = {}
        for h in known:
            held[h] = held.get(h, 0) + 1
        return True

    def _content(
        self, extra: list[Any], lora: str | None, at_root: bool
    ) -> list[bytes | None] | None:
        """Per block: the extra keys that change the block's content (multimodal inputs,
        prompt embeddings, ...), encoded; None when no block has any.

        The LoRA name and the cache_salt are left out: both already seed the root key.
        """
        out: list[bytes | None] | None = None
        for i, entry in enumerate(extra):
            if entry is None:
                continue
            if isinstance(entry, list):
                items = entry[1:] if lora is not None and entry and entry[0] == lora else entry
                if i == 0 and at_root:
                    for j, x in enumerate(items):
                        if isinstance(x, str):
                            items = items[:j] + items[j + 1 :]
                            break
                if not items:
                    continue
            else:
                items = [entry]
            if out is None:
                out = [None] * len(extra)
            out[i] = self._encoder.encode(items)
        return out

    @staticmethod
    def _chain_mixed(
        keyer: DerivedKeyer, parent: int, toks: list[int], bs: int, content: list[bytes | None]
    ) -> list[int]:
        """Chained keys where each block's content extra keys are mixed into its key, so a
        multimodal block never shares a key with a text block of the same token ids."""
        bsz = keyer.block_size
        keys: list[int] = []
        key = parent
        for i in range(len(toks) // bs):
            c = content[i] if i < len(content) else None
            run = toks[i * bs : (i + 1) * bs]
            if c is None:
                ks = keyer.chain(key, run, bsz)
                keys.extend(ks)
                key = ks[-1]
                continue
            for j in range(0, bs, bsz):
                k = keyer.chain(key, run[j : j + bsz], bsz)[0]
                key = xxhash.xxh3_64_intdigest(c, k)
                keys.append(key)
        return keys

    def _drop(self, reason: str, pod: str, ev: BlockStored) -> None:
        self.dropped[reason].inc()
        logger.debug(
            "dropped BlockStored from %s (%s): %d blocks, block_size %d, %d tokens",
            pod,
            reason,
            len(ev.block_hashes),
            ev.block_size,
            len(ev.token_ids),
        )

    def has_orphan(self, st: StreamState, batch: DecodedBatch) -> bool:
        """Whether applying `batch` would orphan a store (derived keys only)."""
        if self._keyer is None:
            return False
        resolve = self.index.resolve
        seen: set[int] = set()
        for ev in batch.events:
            if not isinstance(ev, BlockStored):
                continue
            parent = ev.parent_block_hash
            if (
                parent is not None
                and ev.token_ids
                and ev.kv_cache_spec_kind in (None, *FULL_ATTENTION_KINDS)
                and parent not in seen
                and parent not in st.recent
                and parent not in st.recent_old
            ):
                try:
                    if resolve(st.pod, EngineHash(parent)) is None:
                        return True
                except BACKEND_ERRORS:
                    return False  # no resync while the index cannot answer
            seen.update(ev.block_hashes)
        return False

    def purge_stream(self, st: StreamState, reason: str) -> None:
        w = self.writer(st.pod)
        for tier, held in (st.held or {}).items():
            hashes = [h for h, c in held.items() for _ in range(c)]
            if hashes:
                w.remove(tier, hashes, counted=False)
        w.flush()
        if st.held is not None:
            st.held.clear()
        self.metrics.purges.labels(reason).inc()
