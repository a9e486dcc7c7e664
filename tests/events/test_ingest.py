"""Applying vLLM KV events to the index: keys, reference counts, tiers, groups, ordering."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from kvaware_scorer import Indexer, IndexerConfig
from kvaware_scorer.events.decode import AllBlocksCleared, BlockRemoved, BlockStored, encode_batch
from kvaware_scorer.events.ingest import ReplayResult
from tests.events.conftest import EVENTS_DIR, LEGACY_DIR, stream_frames

POD = "10.0.0.1:8000"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def counter(ix: Indexer, name: str, labels: dict[str, str] | None = None) -> float:
    value = ix.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def dropped(ix: Indexer, reason: str) -> float:
    return counter(ix, "kvaware_dropped_messages_total", {"reason": reason})


def u64s(pool: dict[str, Any], tier: str) -> dict[int, int]:
    return {int(e["u64_hex"], 16): e["physical_blocks"] for e in pool.get(tier, [])}


def tokens(manifest: dict[str, Any], name: str) -> list[int]:
    value = manifest["request_inputs"][name]
    return list(value["tokens"] if isinstance(value, dict) else value)


def stored(
    hashes: list[int],
    toks: list[int],
    parent: int | None = None,
    *,
    block_size: int = 16,
    medium: str | None = "GPU",
    lora: str | None = None,
    extra: list[Any] | None = None,
    group: int | None = 0,
    kind: str | None = "full_attention",
) -> BlockStored:
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=toks,
        block_size=block_size,
        medium=medium,
        lora_name=lora,
        extra_keys=extra if extra is not None else [None] * len(hashes),
        group_idx=group,
        kv_cache_spec_kind=kind,
    )


def removed(hashes: list[int], medium: str | None = "GPU", group: int | None = 0) -> BlockRemoved:
    return BlockRemoved(block_hashes=hashes, medium=medium, group_idx=group)


def frame(*events: Any, rank: int = 0) -> bytes:
    return encode_batch(list(events), 1.0, rank)


def apply_stream(ix: Indexer, directory: Any, names: list[tuple[int, str]]) -> None:
    for seq, name in names:
        ix.ingest(POD, MODEL, (directory / name).read_bytes(), seq)


@pytest.mark.parametrize("directory", [EVENTS_DIR, LEGACY_DIR], ids=["0.33", "0.23"])
def test_fixture_streams_leave_vllm_pool_state(directory: Any, manifest: dict[str, Any]) -> None:
    """After every captured step, the copies held per hash equal vLLM's BlockPool state."""
    from tests.events.conftest import load_manifest

    own = load_manifest(directory)
    checked = 0
    for names in stream_frames(own).values():
        ix = Indexer()
        for seq, name in names:
            ix.ingest(POD, MODEL, (directory / name).read_bytes(), seq)
            pool = manifest["files"][name].get("pool_state_after")
            if pool is None:
                continue
            for tier in pool:
                assert ix.ingestor.held(POD, tier) == u64s(pool, tier), (name, tier)
                checked += 1
            for h in ix.ingestor.held(POD, "GPU"):
                assert ix.index.resolve(POD, h) is not None
        assert dropped(ix, "orphaned_parent") == 0
    assert checked >= (12 if directory == EVENTS_DIR else 7)


def test_index_reference_counts_equal_physical_copies(manifest: dict[str, Any]) -> None:
    """The duplicate-hash stream leaves exactly one reference per physical copy in the index:
    the re-stored hash survives one removal and goes with the next."""
    ix = Indexer()
    names = stream_frames(manifest)["inproc://kv-events-dup"]
    r1 = tokens(manifest, "r1")
    for seq, name in names[:2]:
        ix.ingest(POD, MODEL, (EVENTS_DIR / name).read_bytes(), seq)
    dup = int(manifest["files"]["batch_dup_second_store.msgpack"]["batch"]["events"][0]
              ["block_hashes"][0]["hex"], 16)  # fmt: skip
    assert ix.ingestor.held(POD)[dup] == 2
    ix.ingest(POD, MODEL, (EVENTS_DIR / names[2][1]).read_bytes(), names[2][0])
    assert ix.score(MODEL, r1, [POD]) == {POD: 1.0}  # one copy left: still held
    ix.ingest(POD, MODEL, frame(removed([dup])), 3)
    assert ix.score(MODEL, r1, [POD]) == {POD: 0.75}  # the last copy went with it
    assert dup not in ix.ingestor.held(POD)
    assert ix.index.resolve(POD, dup) is None


def test_main_stream_scores_follow_the_pool(manifest: dict[str, Any]) -> None:
    """Scoring the fixture requests' own tokens tracks vLLM's pool through the main stream."""
    ix = Indexer()
    names = dict(stream_frames(manifest)["inproc://kv-events"])
    r1, r2, r5 = tokens(manifest, "r1"), tokens(manifest, "r2"), tokens(manifest, "r5")
    r1d = r1 + tokens(manifest, "r1_decode")
    r6, r9 = tokens(manifest, "r6"), tokens(manifest, "r9")
    lora = {"lora_name": "sql-lora", "cache_salt": "tenant-a"}

    def step(seq: int) -> None:
        ix.ingest(POD, MODEL, (EVENTS_DIR / names[seq]).read_bytes(), seq)

    step(0)
    assert ix.score(MODEL, r1, [POD]) == {POD: 1.0}
    step(1)
    assert ix.score(MODEL, r1d, [POD]) == {POD: 1.0}
    step(2)
    assert ix.score(MODEL, r2, [POD]) == {POD: 1.0}
    step(3)  # r1's tail (decode block, block 3) evicted
    assert ix.score(MODEL, r1, [POD]) == {POD: 0.75}
    step(4)  # more evictions, then r5 stored
    assert ix.score(MODEL, r1, [POD]) == {POD: 0.25}
    assert ix.score(MODEL, r5, [POD]) == {POD: 1.0}
    assert ix.score("another-model", r5, [POD]) == {POD: 0.0}
    step(5)  # AllBlocksCleared
    assert ix.score(MODEL, r5, [POD]) == {POD: 0.0}
    assert ix.index.stats().entries == 0
    step(6)  # LoRA + cache_salt, GPU and CPU
    assert ix.score(MODEL, r6, [POD], **lora) == {POD: 1.0}
    assert ix.score(MODEL, r6, [POD], lora_name="sql-lora") == {POD: 0.0}
    assert ix.score(MODEL, r6, [POD], cache_salt="tenant-a") == {POD: 0.0}
    assert ix.score(MODEL, r6, [POD]) == {POD: 0.0}
    step(7)  # offload placeholder on CPU, then its removal
    step(8)  # kv_cache_report_mode=full: hits re-announced, one new block
    assert ix.score(MODEL, r9, [POD], **lora) == {POD: 1.0}
    assert counter(ix, "kvaware_blocks_skipped_total", {"reason": "reannounced"}) == 3
    assert counter(ix, "kvaware_purges_total", {"reason": "all_blocks_cleared"}) == 1


def test_reannounced_hits_do_not_inflate_references(manifest: dict[str, Any]) -> None:
    """After a full-report re-announcement, one BlockRemoved per block empties the GPU tier."""
    ix = Indexer()
    names = dict(stream_frames(manifest)["inproc://kv-events"])
    for seq in (6, 8):
        ix.ingest(POD, MODEL, (EVENTS_DIR / names[seq]).read_bytes(), None)
    gpu = ix.ingestor.held(POD, "gpu")
    assert set(gpu.values()) == {1} and len(gpu) == 4
    ix.ingest(POD, MODEL, frame(*[removed([h]) for h in gpu]))
    assert ix.ingestor.held(POD, "gpu") == {}
    r9 = tokens(manifest, "r9")
    m = ix.match(MODEL, r9, [POD], lora_name="sql-lora", cache_salt="tenant-a")
    assert m.pods[POD].blocks == 3 and dict(m.pods[POD].tiers) == {"cpu": 3}


def test_unknown_parent_is_orphaned_not_keyed_as_block_zero(manifest: dict[str, Any]) -> None:
    """A store whose parent was never seen is counted as orphaned and not indexed at all."""
    ix = Indexer()
    payload = (EVENTS_DIR / "batch_stored_decode_continuation.msgpack").read_bytes()
    ix.ingest(POD, MODEL, payload, None)
    assert counter(ix, "kvaware_orphaned_blocks_total") == 1
    assert dropped(ix, "orphaned_parent") == 1
    assert ix.index.stats().entries == 0 and ix.ingestor.held(POD) == {}
    decode = tokens(manifest, "r1_decode")
    assert ix.score(MODEL, decode, [POD]) == {POD: 0.0}


def test_orphans_cascade_to_their_continuations() -> None:
    """Continuations of an orphaned run are orphaned too (their parents were never keyed)."""
    ix = Indexer()
    ix.ingest(POD, MODEL, frame(stored([2], list(range(16)), parent=1)))
    ix.ingest(POD, MODEL, frame(stored([3], list(range(16, 32)), parent=2)))
    assert counter(ix, "kvaware_orphaned_blocks_total") == 2
    assert ix.index.stats().entries == 0


def test_multimodal_and_embedding_extra_keys_change_keys() -> None:
    """Blocks carrying multimodal or prompt-embedding extra keys never match the same tokens
    sent as text, nor each other."""
    toks = list(range(100, 132))
    ix = Indexer()
    text, image, image2, embeds = "t:1", "i:1", "i:2", "e:1"
    ix.ingest(text, MODEL, frame(stored([1, 2], toks)))
    ix.ingest(image, MODEL, frame(stored([3, 4], toks, extra=[[["img-a", 0]], [["img-a", 16]]])))
    ix.ingest(image2, MODEL, frame(stored([5, 6], toks, extra=[[["img-b", 0]], None])))
    ix.ingest(embeds, MODEL, frame(stored([7, 8], toks, extra=[[b"\x01" * 32], [b"\x02" * 32]])))
    scores = ix.score(MODEL, toks, [text, image, image2, embeds])
    assert scores == {text: 1.0, image: 0.0, image2: 0.0, embeds: 0.0}
    assert ix.index.stats().blocks == 8


def test_cache_salt_after_lora_name_and_alone() -> None:
    """The salt is read after the LoRA name (or alone) from block 0's extra keys and seeds the
    root, so only requests scored with the same salt match."""
    toks = list(range(48))
    ix = Indexer()
    ix.ingest("a:1", MODEL, frame(stored([1, 2, 3], toks, extra=[["s1"], None, None])))
    ix.ingest(
        "b:1",
        MODEL,
        frame(stored([4, 5, 6], toks, lora="ad", extra=[["ad", "ad"], ["ad"], ["ad"]])),
    )
    pods = ["a:1", "b:1"]
    assert ix.score(MODEL, toks, pods, cache_salt="s1") == {"a:1": 1.0, "b:1": 0.0}
    assert ix.score(MODEL, toks, pods) == {"a:1": 0.0, "b:1": 0.0}
    assert ix.score(MODEL, toks, pods, lora_name="ad", cache_salt="ad") == {"a:1": 0.0, "b:1": 1.0}


def test_event_block_size_multiple_of_ours_is_rechunked(manifest: dict[str, Any]) -> None:
    """With 8-token index blocks, 16-token events are re-chunked; removals drop both halves."""
    ix = Indexer({"tokenProcessorConfig": {"blockSize": 8}})
    names = dict(stream_frames(manifest)["inproc://kv-events"])
    for seq in range(3):
        ix.ingest(POD, MODEL, (EVENTS_DIR / names[seq]).read_bytes(), seq)
    r1 = tokens(manifest, "r1")
    assert ix.score(MODEL, r1 + tokens(manifest, "r1_decode"), [POD]) == {POD: 1.0}
    ix.ingest(POD, MODEL, (EVENTS_DIR / names[3]).read_bytes(), 3)
    assert ix.score(MODEL, r1, [POD]) == {POD: 0.75}
    assert ix.match(MODEL, r1, [POD]).pods[POD].blocks == 6


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"tokenProcessorConfig": {"blockSize": 32}}, "block_size_mismatch"),
        ({"tokenProcessorConfig": {"blockSize": 5}}, "block_size_mismatch"),
        (
            {"tokenProcessorConfig": {"blockSize": 32, "keyMode": "vllm"}},
            "block_size_mismatch",
        ),
        (
            {"tokenProcessorConfig": {"blockSize": 8, "keyMode": "vllm"}},
            "block_size_mismatch",
        ),
    ],
)
def test_block_size_mismatch_is_rejected_and_counted(config: dict[str, Any], reason: str) -> None:
    """An event block size our block size cannot tile (or any other one in vllm mode) is
    refused with a counted reason, never mis-keyed."""
    ix = Indexer(config)
    ix.ingest(POD, MODEL, (EVENTS_DIR / "batch_stored_int_hashes.msgpack").read_bytes(), 0)
    assert dropped(ix, reason) == 1
    assert ix.index.stats().entries == 0


def test_token_count_mismatch_is_rejected() -> None:
    """A store whose token count is not blocks x block_size is dropped with a reason."""
    ix = Indexer()
    ix.ingest(POD, MODEL, frame(stored([1, 2], list(range(20)))))
    assert dropped(ix, "token_count_mismatch") == 1
    assert ix.index.stats().entries == 0


def test_vllm_key_mode_uses_engine_hashes_as_keys(manifest: dict[str, Any]) -> None:
    """In vllm key mode the engine hashes are the keys, and vLLM-exact request keys match."""
    ix = Indexer(
        {
            "tokenProcessorConfig": {
                "keyMode": "vllm",
                "loraAdapters": {"sql-lora": "/adapters/sql-lora"},
            }
        }
    )
    names = dict(stream_frames(manifest)["inproc://kv-events"])
    ix.ingest(POD, None, (EVENTS_DIR / names[0]).read_bytes(), 0)
    r1 = tokens(manifest, "r1")
    assert ix.block_keys(r1, MODEL) == list(ix.ingestor.held(POD))
    assert ix.score(MODEL, r1, [POD]) == {POD: 1.0}
    for seq in range(1, 7):
        ix.ingest(POD, None, (EVENTS_DIR / names[seq]).read_bytes(), seq)
    r6 = tokens(manifest, "r6")
    assert ix.score(MODEL, r6, [POD], lora_name="sql-lora", cache_salt="tenant-a") == {POD: 1.0}


def test_offload_placeholder_adds_a_tier_to_known_blocks(manifest: dict[str, Any]) -> None:
    """An offload placeholder (no tokens, block size 0) adds its tier to a block the pod holds;
    unknown hashes are skipped and counted."""
    ix = Indexer()
    ix.ingest(POD, MODEL, (EVENTS_DIR / "batch_stored_int_hashes.msgpack").read_bytes(), 0)
    held = list(ix.ingestor.held(POD))
    placeholder = BlockStored([held[0], 12345], None, [], 0, medium="CPU", group_idx=0)
    ix.ingest(POD, MODEL, frame(placeholder, removed([held[0]])), 1)
    r1 = tokens(manifest, "r1")
    m = ix.match(MODEL, r1, [POD]).pods[POD]
    assert m.blocks == 4 and dict(m.tiers) == {"cpu": 1, "gpu": 3}
    assert ix.ingestor.held(POD, "cpu") == {held[0]: 1}
    assert counter(ix, "kvaware_blocks_skipped_total", {"reason": "unknown_block"}) == 1


@pytest.mark.parametrize("medium", ["cpu", "Cpu", " CPU "])
def test_medium_is_normalized_case_insensitively(medium: str) -> None:
    """Media differing only in case or spaces land on the same tier."""
    ix = Indexer()
    ix.ingest(POD, MODEL, frame(stored([1], list(range(16)), medium="CPU")))
    ix.ingest(POD, MODEL, frame(removed([1], medium=medium)))
    assert ix.ingestor.held(POD, "cpu") == {}
    assert ix.index.stats().entries == 0


def test_unknown_and_unset_media() -> None:
    """An unknown medium becomes its own lower-case tier; a nil medium is the default tier."""
    ix = Indexer()
    ix.ingest(POD, MODEL, frame(stored([1], list(range(16)), medium="LMCache_Disk")))
    ix.ingest("b:1", MODEL, frame(stored([2], list(range(16)), medium=None)))
    assert ix.ingestor.held(POD, "lmcache_disk") == {1: 1}
    assert ix.ingestor.held("b:1", "gpu") == {2: 1}
    m = ix.match(MODEL, list(range(16)), [POD, "b:1"]).pods
    assert dict(m[POD].tiers) == {"lmcache_disk": 1} and m[POD].weight == 0.5
    assert dict(m["b:1"].tiers) == {"gpu": 1}


def test_hybrid_model_indexes_the_full_attention_group_only() -> None:
    """Only the full-attention group's blocks are indexed; sliding-window and Mamba group
    events (same hashes) neither add nor remove references."""
    toks = list(range(32))
    ix = Indexer()
    ix.ingest(
        POD,
        MODEL,
        frame(
            stored([1, 2], toks, group=0, kind="mamba"),
            stored([1, 2], toks, group=1, kind="full_attention"),
            stored([1, 2], toks, group=2, kind="sliding_window"),
        ),
    )
    assert ix.ingestor.held(POD) == {1: 1, 2: 1}
    ix.ingest(POD, MODEL, frame(removed([1, 2], group=0), removed([2], group=2)))
    assert ix.score(MODEL, toks, [POD]) == {POD: 1.0}
    ix.ingest(POD, MODEL, frame(removed([2], group=1)))
    assert ix.score(MODEL, toks, [POD]) == {POD: 0.5}
    assert counter(ix, "kvaware_blocks_skipped_total", {"reason": "kv_group"}) == 7


def test_a_group_of_unknown_kind_is_indexed_like_one_without_a_kind() -> None:
    """vLLM reports "unknown" for attention specs it does not classify (a platform plugin's
    own spec, the only group of its model): group 0 is indexed until a full-attention group is
    learned; kinds it does classify as not prefix-cacheable stay skipped."""
    toks = list(range(32))
    ix = Indexer()
    ix.ingest(POD, MODEL, frame(stored([1, 2], toks, kind="unknown")))
    assert ix.score(MODEL, toks, [POD]) == {POD: 1.0}
    ix.ingest(POD, MODEL, frame(removed([2])))
    assert ix.score(MODEL, toks, [POD]) == {POD: 0.5}
    hybrid = Indexer()
    hybrid.ingest(
        POD,
        MODEL,
        frame(
            stored([1, 2], toks, group=0, kind="chunked_local_attention"),
            stored([1, 2], toks, group=1, kind="full_attention"),
            stored([1, 2], toks, group=2, kind="unknown"),
        ),
    )
    assert hybrid.ingestor.held(POD) == {1: 1, 2: 1}


def test_data_parallel_ranks_are_separate_streams() -> None:
    """Each DP rank has its own sequence and references: a restart or clear of one rank drops
    only that rank's blocks."""
    a, b = list(range(16)), list(range(16, 32))
    ix = Indexer()
    ix.ingest(POD, MODEL, frame(stored([1], a), rank=0), 0)
    ix.ingest(POD, MODEL, frame(stored([1], a), stored([2], b), rank=1), 0)
    ix.ingest(POD, MODEL, frame(removed([2]), rank=0), 1)  # rank 0 never held 2
    assert ix.ingestor.held(POD) == {1: 2, 2: 1}
    ix.ingest(POD, MODEL, frame(AllBlocksCleared(), rank=1), 1)
    assert ix.ingestor.held(POD) == {1: 1}
    assert ix.score(MODEL, a, [POD]) == {POD: 1.0}
    ix.ingest(POD, MODEL, frame(stored([2], b), rank=1), 2)
    ix.ingest(POD, MODEL, frame(rank=1), 0)  # rank 1 restarted
    assert ix.ingestor.held(POD) == {1: 1}
    assert ix.score(MODEL, a, [POD]) == {POD: 1.0} and ix.score(MODEL, b, [POD]) == {POD: 0.0}
    assert counter(ix, "kvaware_purges_total", {"reason": "publisher_restart"}) == 1
    assert {r: s.last_seq for r, s in ix.ingestor.streams(POD).items()} == {0: 1, 1: 0}


def test_publisher_restart_purges_the_pod_then_applies() -> None:
    """A seq going back purges the pod's blocks and then applies the new frame."""
    ix = Indexer()
    a, b = list(range(16)), list(range(16, 32))
    for seq in range(3):
        ix.ingest(POD, MODEL, frame(stored([seq + 1], a)), seq)
    ix.ingest(POD, MODEL, frame(stored([9], b)), 0)
    assert ix.score(MODEL, a, [POD]) == {POD: 0.0}
    assert ix.score(MODEL, b, [POD]) == {POD: 1.0}
    assert counter(ix, "kvaware_purges_total", {"reason": "publisher_restart"}) == 1
    assert ix.ingestor.streams(POD)[0].last_seq == 0


def test_gap_without_replay_counts_lost_batches() -> None:
    """A seq gap with no replay source counts the gap and every lost batch."""
    ix = Indexer()
    ix.ingest(POD, MODEL, frame(), 0)
    ix.ingest(POD, MODEL, frame(), 4)
    ix.ingest(POD, MODEL, frame(), 5)
    assert counter(ix, "kvaware_seq_gaps_total") == 1
    assert counter(ix, "kvaware_lost_batches_total") == 3


class BufferReplay:
    """An in-process replay source over a publisher-like buffer of (seq, payload)."""

    def __init__(self, frames: list[tuple[int, bytes]], status: str = "ok") -> None:
        self.frames = frames
        self.status = status
        self.requests: list[tuple[str, int, int, str]] = []

    def replay(self, pod: str, rank: int, start_seq: int, reason: str) -> ReplayResult | None:
        self.requests.append((pod, rank, start_seq, reason))
        return ReplayResult([f for f in self.frames if f[0] >= start_seq], self.status)


def test_gap_is_filled_from_the_replay_source_in_order() -> None:
    """A gap is replayed in order before the live frame; frames the replay brought that are
    newer than the live one are left to the live stream, and live duplicates are skipped."""
    toks = list(range(64))
    frames = [
        (0, frame(stored([1], toks[:16]))),
        (1, frame(stored([2], toks[16:32], parent=1))),
        (2, frame(stored([3], toks[32:48], parent=2))),
        (3, frame(stored([4], toks[48:64], parent=3))),
    ]
    ix = Indexer()
    source = BufferReplay(frames)
    ix.ingestor.set_replay_source(source)
    ix.ingest(POD, MODEL, frames[0][1], 0)
    ix.ingest(POD, MODEL, frames[2][1], 2)
    # asked from the last applied seq: the publisher's batch there proves it did not restart
    assert source.requests == [(POD, 0, 0, "gap")]
    assert ix.ingestor.held(POD) == {1: 1, 2: 1, 3: 1}
    ix.ingest(POD, MODEL, frames[3][1], 3)
    assert ix.score(MODEL, toks, [POD]) == {POD: 1.0}
    assert counter(ix, "kvaware_replays_total", {"result": "ok"}) == 1
    assert counter(ix, "kvaware_replayed_batches_total", {"reason": "gap"}) == 1
    assert counter(ix, "kvaware_lost_batches_total") == 0
    assert counter(ix, "kvaware_orphaned_blocks_total") == 0


def test_restart_hidden_behind_a_gap_is_detected_by_the_replay_buffer() -> None:
    """A publisher that restarted and sent more batches than before while frames were lost
    looks like a seq gap; its different batch under the last applied seq gives it away, so the
    pod is purged and rebuilt from the new publisher's buffer."""
    old, new = list(range(16)), list(range(100, 116))
    ix = Indexer()
    ix.ingest(POD, MODEL, frame(stored([1], old)), 0)
    ix.ingest(POD, MODEL, frame(stored([2], old[:8] + new[:8])), 1)
    assert ix.score(MODEL, old, [POD]) == {POD: 1.0}
    restarted = [(q, frame(stored([10 + q], new))) for q in range(4)]
    source = BufferReplay(restarted)
    ix.ingestor.set_replay_source(source)
    ix.ingest(POD, MODEL, frame(stored([20], list(range(200, 216)))), 4)  # seq 4 > 1 + 1
    assert source.requests[0] == (POD, 0, 1, "gap")
    assert source.requests[1] == (POD, 0, 0, "join")
    assert ix.score(MODEL, old, [POD]) == {POD: 0.0}
    assert ix.score(MODEL, new, [POD]) == {POD: 1.0}
    assert counter(ix, "kvaware_purges_total", {"reason": "publisher_restart"}) == 1
    assert counter(ix, "kvaware_lost_batches_total") == 0


def test_gap_with_the_same_batch_under_the_last_seq_is_a_plain_gap() -> None:
    """When the buffer holds the very batch applied under the last seq, a gap is filled and
    nothing is purged."""
    toks = list(range(32))
    frames = [(0, frame(stored([1], toks[:16]))), (1, frame(stored([2], toks[16:], parent=1)))]
    ix = Indexer()
    ix.ingestor.set_replay_source(BufferReplay(frames))
    ix.ingest(POD, MODEL, frames[0][1], 0)
    ix.ingest(POD, MODEL, frame(), 2)
    assert ix.score(MODEL, toks, [POD]) == {POD: 1.0}
    assert counter(ix, "kvaware_purges_total", {"reason": "publisher_restart"}) == 0


def test_join_replays_history_before_the_first_frame() -> None:
    """The first frame of a stream with seq > 0 first replays the buffered history, so later
    continuations find their parents."""
    toks = list(range(48))
    frames = [
        (7, frame(stored([1, 2], toks[:32]))),
        (8, frame(removed([9]))),
        (9, frame(stored([3], toks[32:48], parent=2))),
    ]
    ix = Indexer()
    source = BufferReplay(frames)
    ix.ingestor.set_replay_source(source)
    ix.ingest(POD, MODEL, frames[2][1], 9)
    assert source.requests == [(POD, 0, 0, "join")]
    assert ix.score(MODEL, toks, [POD]) == {POD: 1.0}
    assert counter(ix, "kvaware_lost_batches_total") == 0
    assert counter(ix, "kvaware_replayed_batches_total", {"reason": "join"}) == 2


def test_orphan_triggers_a_resync_when_history_is_incomplete() -> None:
    """When the join replay failed, the first orphan asks for a replay again and the stream is
    rebuilt in order from the publisher's buffer."""
    toks = list(range(48))
    frames = [
        (0, frame(stored([1], toks[:16]))),
        (1, frame(stored([2], toks[16:32], parent=1))),
        (2, frame(removed([77]))),
        (3, frame(stored([3], toks[32:48], parent=2))),
    ]
    ix = Indexer()
    source = BufferReplay([], status="timeout")
    ix.ingestor.set_replay_source(source)
    ix.ingest(POD, MODEL, frames[2][1], 2)  # the join replay times out with nothing
    source.frames, source.status = frames, "ok"
    assert ix.ingestor.streams(POD)[0].incomplete
    ix.ingest(POD, MODEL, frames[3][1], 3)  # parent 2 unknown -> resync
    assert [r[3] for r in source.requests] == ["join", "resync"]
    assert ix.score(MODEL, toks, [POD]) == {POD: 1.0}
    assert counter(ix, "kvaware_orphaned_blocks_total") == 0
    assert not ix.ingestor.streams(POD)[0].incomplete


def test_all_blocks_cleared_purges_but_keeps_the_sequence() -> None:
    """AllBlocksCleared purges the pod; the stream's seq carries on without a gap or join."""
    ix = Indexer()
    source = BufferReplay([])
    ix.ingestor.set_replay_source(source)
    ix.ingest(POD, MODEL, frame(stored([1], list(range(16)))), 0)
    ix.ingest(POD, MODEL, frame(AllBlocksCleared(), stored([2], list(range(16, 32)))), 1)
    ix.ingest(POD, MODEL, frame(), 2)
    assert ix.ingestor.held(POD) == {2: 1}
    assert source.requests == []
    assert counter(ix, "kvaware_seq_gaps_total") == 0


def test_all_blocks_cleared_twice_by_the_gpu_and_host_pools() -> None:
    """A hybrid host pool clears too (AllBlocksCleared twice, no medium): every tier of the
    pod is dropped, and the stores after it stand."""
    ix = Indexer()
    ix.ingest(POD, MODEL, frame(stored([1, 2], list(range(32)))), 0)
    ix.ingest(POD, MODEL, frame(stored([1], [], block_size=0, medium="CPU", kind=None)), 1)
    assert ix.ingestor.references(POD) == {"gpu": {1: 1, 2: 1}, "cpu": {1: 1}}
    cleared = frame(AllBlocksCleared(), AllBlocksCleared(), stored([3], list(range(50, 66))))
    ix.ingest(POD, MODEL, cleared, 2)
    assert ix.ingestor.references(POD) == {"gpu": {3: 1}}
    assert counter(ix, "kvaware_events_total", {"type": "AllBlocksCleared"}) == 2
    assert ix.score(MODEL, list(range(32)), [POD]) == {POD: 0.0}


def test_purge_pod_forgets_its_streams() -> None:
    """After Indexer.purge_pod the pod's next frame starts a new stream (a join)."""
    ix = Indexer()
    ix.ingest(POD, MODEL, frame(stored([1], list(range(16)))), 0)
    ix.purge_pod(POD, reason="endpoint_removed")
    assert ix.ingestor.streams(POD) == {}
    ix.ingest(POD, MODEL, frame(), 5)
    assert counter(ix, "kvaware_seq_gaps_total") == 0
    assert ix.ingestor.streams(POD)[0].first_seq == 5


def test_parentless_store_needs_a_model_unless_lora() -> None:
    """Without a model, parent-less stores are dropped (no_model) unless a LoRA names them; a
    model seen once is remembered for the stream."""
    toks = list(range(16))
    ix = Indexer()
    ix.ingest(POD, None, frame(stored([1], toks)))
    assert dropped(ix, "no_model") == 1
    ix.ingest(POD, None, frame(stored([2], toks, lora="ad", extra=[["ad"]])))
    assert ix.score(MODEL, toks, [POD], lora_name="ad") == {POD: 1.0}
    ix.ingest(POD, MODEL, frame())
    ix.ingest(POD, None, frame(stored([3], toks)))
    assert ix.score(MODEL, toks, [POD]) == {POD: 1.0}


def test_bad_payloads_are_counted_never_raised() -> None:
    """Garbage frames are counted as decode errors and do not disturb the stream."""
    ix = Indexer()
    ix.ingest(POD, MODEL, b"\x00garbage", 0)
    ix.ingest(POD, MODEL, msgspec.msgpack.encode({"not": "a batch"}), None)
    assert dropped(ix, "decode_error") == 2
    assert ix.ingestor.streams(POD) == {}


def test_default_tier_comes_from_the_config() -> None:
    """Events with a nil medium use the configured default tier."""
    ix = Indexer(IndexerConfig(default_tier="cpu"))
    ix.ingest(POD, MODEL, frame(stored([1], list(range(16)), medium=None)))
    assert ix.ingestor.held(POD, "cpu") == {1: 1}


def test_parentless_duplicate_is_counted_conservatively() -> None:
    """An identical one-block prompt recomputed while cached (a real second copy, parent-less)
    looks like a re-announcement and adds no reference: one eviction then hides the block early
    (a miss), and nothing stale is left after the second."""
    from tests.events.pool_model import PoolModel

    toks = list(range(16))
    pool = PoolModel(4)
    ix = Indexer()
    seq = 0

    def flush() -> None:
        nonlocal seq
        if events := pool.take_events():
            ix.ingest(POD, MODEL, frame(*events), seq)
            seq += 1

    for _ in range(2):
        req = pool.admit(toks)
        assert req is not None
        pool.finish(req)
        flush()
    assert pool.gpu_state() == {next(iter(pool.gpu_state())): 2}
    assert set(ix.ingestor.held(POD).values()) == {1}
    h = next(iter(pool.gpu_state()))
    seen_miss = False
    for i in range(8):  # distinct one-block prompts evict the free blocks, oldest first
        req = pool.admit(list(range(1000 + 16 * i, 1016 + 16 * i)))
        assert req is not None
        pool.finish(req)
        flush()
        copies = pool.gpu_state().get(h, 0)
        held = ix.ingestor.held(POD).get(h, 0)
        assert held <= copies  # never a stale positive
        seen_miss |= copies == 1 and held == 0
    assert seen_miss and h not in pool.gpu_state()
    assert ix.score(MODEL, toks, [POD]) == {POD: 0.0}


def test_parent_stored_earlier_in_the_same_batch() -> None:
    """A store whose parent was stored earlier in the same batch is chained, not orphaned."""
    toks = list(range(48))
    ix = Indexer()
    ix.ingest(POD, MODEL, frame(stored([1, 2], toks[:32]), stored([3], toks[32:], parent=2)), 0)
    assert ix.score(MODEL, toks, [POD]) == {POD: 1.0}
    assert counter(ix, "kvaware_orphaned_blocks_total") == 0


def test_single_rank_pod_keeps_its_references_in_the_index_only() -> None:
    """A pod streaming from one DP rank keeps no reference map of its own: the index's counts
    are the stream's, and removals and re-announcements are answered by the index."""
    toks = list(range(48))
    ix = Indexer()
    ix.ingest(POD, MODEL, frame(stored([1, 2], toks[:32]), stored([3], toks[32:], parent=2)), 0)
    ix.ingest(POD, MODEL, frame(stored([1, 2], toks[:32]), removed([3, 9])), 1)  # full report
    st = ix.ingestor.streams(POD)[0]
    assert st.held is None
    assert ix.ingestor.held(POD) == {1: 1, 2: 1}
    assert counter(ix, "kvaware_blocks_skipped_total", {"reason": "reannounced"}) == 2
    assert counter(ix, "kvaware_blocks_skipped_total", {"reason": "unknown_block"}) == 1
    assert counter(ix, "kvaware_blocks_removed_total") == 1
    ix.ingest(POD, MODEL, frame(removed([1, 2])), 2)
    assert ix.index.stats().entries == 0 and ix.ingestor.held(POD) == {}


def test_second_rank_takes_the_first_ranks_references_from_the_index() -> None:
    """When a second DP rank starts streaming, the first rank's references so far (known only
    to the index until then) become its own, so its later restart drops exactly those."""
    a, b, c = list(range(16)), list(range(16, 32)), list(range(32, 48))
    ix = Indexer()
    ix.ingest(POD, MODEL, frame(stored([1, 2], a + b), stored([3], c, parent=2), rank=0), 0)
    ix.ingest(POD, MODEL, frame(stored([1], a), rank=1), 0)
    streams = ix.ingestor.streams(POD)
    assert streams[0].held == {"gpu": {1: 1, 2: 1, 3: 1}} and streams[1].held == {"gpu": {1: 1}}
    ix.ingest(POD, MODEL, frame(removed([1, 2]), rank=1), 1)  # rank 1 never held 2
    assert ix.ingestor.held(POD) == {1: 1, 2: 1, 3: 1}
    ix.ingest(POD, MODEL, frame(rank=0), 0)  # rank 0 restarted
    assert ix.ingestor.held(POD) == {}
    assert ix.index.stats().entries == 0
    ix.ingest(POD, MODEL, frame(stored([1], a), rank=1), 2)
    assert ix.score(MODEL, a + b, [POD]) == {POD: 0.5}
    assert ix.ingestor.held(POD, rank=1) == {1: 1} and ix.ingestor.held(POD, rank=0) == {}


def test_parent_known_from_this_streams_recent_stores() -> None:
    """A continuation whose parent this stream stored lately is keyed from that parent even
    after the parent was evicted (vLLM still holds the continuation), as vLLM's pool says."""
    toks = list(range(32))
    ix = Indexer()
    ix.ingest(POD, MODEL, frame(stored([1], toks[:16])), 0)
    ix.ingest(POD, MODEL, frame(removed([1]), stored([2], toks[16:], parent=1)), 1)
    assert counter(ix, "kvaware_orphaned_blocks_total") == 0
    assert ix.ingestor.held(POD) == {2: 1}
    assert ix.index.lookup(ix.block_keys(toks, MODEL)[1:], [POD])[POD].blocks == 1
    assert ix.score(MODEL, toks, [POD]) == {POD: 0.0}  # block 0 is gone: no prefix match


def test_restart_forgets_the_recent_parents() -> None:
    """After a publisher restart, hashes of the old run no longer name parents."""
    toks = list(range(32))
    ix = Indexer()
    ix.ingest(POD, MODEL, frame(stored([1], toks[:16])), 0)
    ix.ingest(POD, MODEL, frame(stored([2], toks[16:], parent=1)), 0)  # seq back: restarted
    assert counter(ix, "kvaware_orphaned_blocks_total") == 1
    assert ix.index.stats().entries == 0


def test_old_parents_are_resolved_through_the_index() -> None:
    """A parent stored long ago (beyond the recent stores) is found through the index."""
    ix = Indexer()
    first = list(range(32))
    ix.ingest(POD, MODEL, frame(stored([1, 2], first)), 0)
    filler = [stored([100 + i], list(range(1000 + 16 * i, 1016 + 16 * i))) for i in range(3000)]
    ix.ingest(POD, MODEL, frame(*filler), 1)
    st = ix.ingestor.streams(POD)[0]
    assert 1 not in st.recent and 1 not in st.recent_old
    tail = list(range(500, 516))
    ix.ingest(POD, MODEL, frame(stored([3], tail, parent=1)), 2)
    assert counter(ix, "kvaware_orphaned_blocks_total") == 0
    assert ix.score(MODEL, first[:16] + tail, [POD]) == {POD: 1.0}


def test_idle_streams_release_their_recent_stores() -> None:
    """A sweep empties the recent stores of idle streams (parents then resolve through the
    index) and keeps their sequence state; active streams are left alone."""
    toks = list(range(32))
    ix = Indexer()
    ing = ix.ingestor
    ing.idle_after = 0.0
    ix.ingest(POD, MODEL, frame(stored([1], toks[:16])), 0)
    assert ing.streams(POD)[0].recent
    assert ing.sweep() == 0
    st = ing.streams(POD)[0]
    assert st.recent == {} and st.recent_old == {} and st.last_seq == 0
    ix.ingest(POD, MODEL, frame(stored([2], toks[16:], parent=1)), 1)
    assert counter(ix, "kvaware_orphaned_blocks_total") == 0
    assert counter(ix, "kvaware_seq_gaps_total") == 0
    assert ix.score(MODEL, toks, [POD]) == {POD: 1.0}


def test_vanished_pods_are_forgotten_once_the_index_drops_them() -> None:
    """Pods that stopped sending and that the index no longer holds (evicted, expired) leave
    no stream behind; the sweep runs by itself every sweep_interval seconds."""
    ix = Indexer()
    ing = ix.ingestor
    ing.idle_after = 0.0
    pods = [f"10.1.0.{i}:8000" for i in range(200)]
    for i, pod in enumerate(pods):
        ix.ingest(pod, MODEL, frame(stored([i + 1], list(range(16)))), 0)
    for pod in pods[:150]:
        ix.index.purge(pod)  # as an eviction or the index's expiry would
    ing.sweep_interval = 0.0
    ix.ingest(POD, MODEL, frame(stored([7], list(range(16)))), 0)  # sweeps first
    assert all(ing.streams(p) == {} for p in pods[:150])
    assert all(ing.streams(p)[0].last_seq == 0 for p in pods[150:])
    assert ing.streams(POD)[0].last_seq == 0


# -- payloads made by structs declared as vLLM declares them --------------------------------
# NOTE: the same msgspec options and field order as vllm/distributed/kv_events.py (0.33), plus
# fields and an event type a later vLLM may add: the bytes come from msgspec's own encoder,
# not from ours.


class _VllmEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class _VllmKVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStoredNext(_VllmKVCacheEvent, tag="BlockStored"):
    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: list[list[int]] | None = None
    priority_hint: dict[str, Any] | None = None  # not in vLLM (yet)


class BlockRemovedNext(_VllmKVCacheEvent, tag="BlockRemoved"):
    block_hashes: list[bytes | int]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None
    reason: str | None = None  # not in vLLM (yet)


class BlockPinned(_VllmKVCacheEvent):  # an event type vLLM does not have (yet)
    block_hashes: list[bytes | int]


def test_payloads_of_a_later_vllm_with_digest_hashes_apply() -> None:
    """Events msgspec encodes from vLLM-shaped structs with fields and an event type added
    later, sha256 digests as hashes (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0), LoRA and salt as
    untagged extra keys and a lowercase medium are applied, the unknown event counted."""
    import hashlib

    enc = msgspec.msgpack.Encoder()
    digest = [hashlib.sha256(b"block %d" % i).digest() for i in range(4)]
    toks = list(range(1000, 1064))

    def payload(*events: Any) -> bytes:
        return enc.encode(_VllmEventBatch(1.0, list(events), 0))

    lora = "sql-lora"
    first = BlockStoredNext(
        digest[:3],
        None,
        toks[:48],
        16,
        7,
        "GPU",
        lora,
        extra_keys=[(lora, "tenant-a"), (lora,), (lora,)],
        group_idx=0,
        kv_cache_spec_kind="full_attention",
        session_id="s-1",
        priority_hint={"level": 2},
    )
    decode = BlockStoredNext(
        [digest[3]], digest[2], toks[48:], 16, 7, "GPU", lora, extra_keys=[(lora,)], group_idx=0
    )
    offload = BlockStoredNext([digest[0]], None, [], 0, None, "cpu", None, group_idx=0)
    ix = Indexer()
    ix.ingest(POD, MODEL, payload(first), 0)
    ix.ingest(POD, MODEL, payload(decode, offload), 1)
    ix.ingest(
        POD,
        MODEL,
        payload(BlockPinned([digest[1]]), BlockRemovedNext([digest[3]], "GPU", 0, reason="lru")),
        2,
    )
    low = [int.from_bytes(d[-8:], "big") for d in digest]
    assert ix.ingestor.references(POD) == {
        "gpu": {low[0]: 1, low[1]: 1, low[2]: 1},
        "cpu": {low[0]: 1},
    }
    m = ix.match(MODEL, toks, [POD], lora_name=lora, cache_salt="tenant-a").pods[POD]
    assert m.blocks == 3 and dict(m.tiers) == {"gpu": 3}
    assert ix.score(MODEL, toks, [POD], lora_name=lora) == {POD: 0.0}  # salt isolates
    assert dropped(ix, "unknown_event_type") == 1 and dropped(ix, "malformed_event") == 0
    assert counter(ix, "kvaware_orphaned_blocks_total") == 0


def test_hybrid_partial_hash_units_then_the_full_physical_block() -> None:
    """A hybrid model with 32-token physical blocks and 16-token hash units announces a full
    hash unit inside a not yet full block (block_size 16), then the full block under its last
    unit's hash (block_size 32) and removes the partial one: every unit stays indexed once."""
    toks = list(range(64))
    ix = Indexer()
    ix.ingest(POD, MODEL, frame(stored([11], toks[:32], block_size=32)), 0)
    ix.ingest(POD, MODEL, frame(stored([12], toks[32:48], parent=11)), 1)  # partial unit
    assert ix.score(MODEL, toks[:48], [POD]) == {POD: 1.0}
    ix.ingest(
        POD, MODEL, frame(removed([12]), stored([13], toks[32:64], parent=11, block_size=32)), 2
    )
    assert ix.score(MODEL, toks, [POD]) == {POD: 1.0}
    assert ix.ingestor.held(POD) == {11: 1, 13: 1}
    assert ix.index.stats().entries == 4
    ix.ingest(POD, MODEL, frame(removed([13])), 3)
    assert ix.match(MODEL, toks, [POD]).pods[POD].blocks == 2
    assert dropped(ix, "block_size_mismatch") == 0


def _history() -> list[tuple[int, bytes]]:
    """A publisher's buffer: stores, a duplicate copy, an eviction, an offload, a decode."""
    toks = list(range(64))
    return [
        (0, frame(stored([1, 2], toks[:32]))),
        (1, frame(stored([3], toks[32:48], parent=2))),
        (2, frame(stored([3], toks[32:48], parent=2))),  # a second physical copy
        (3, frame(removed([3]), stored([5], toks[48:64], parent=3))),
        (4, frame(stored([1], [], block_size=0, medium="CPU", kind=None))),
        (5, frame(removed([5]))),
    ]


@pytest.mark.parametrize("buffer_from", [0, 2], ids=["whole-history", "buffer-rolled"])
def test_restarted_ingestor_on_a_shared_index_does_not_count_twice(buffer_from: int) -> None:
    """A new ingestor joining streams whose blocks an earlier one already wrote to the shared
    index (an ingest process restarted on Redis) never counts a reference twice: with the
    whole history buffered it rebuilds vLLM's references exactly, else it merges the buffer
    (a duplicate copy may then be undercounted, never a stale one kept)."""
    history = _history()
    first = Indexer()
    for seq, payload in history[:5]:
        first.ingest(POD, MODEL, payload, seq)
    assert first.ingestor.references(POD) == {"gpu": {1: 1, 2: 1, 3: 1, 5: 1}, "cpu": {1: 1}}
    again = Indexer(index=first.index)
    again.ingestor.set_replay_source(BufferReplay(history[buffer_from:5]))
    again.ingest(POD, MODEL, history[5][1], 5)
    if buffer_from == 0:
        assert again.ingestor.references(POD) == {"gpu": {1: 1, 2: 1, 3: 1}, "cpu": {1: 1}}
        assert counter(again, "kvaware_purges_total", {"reason": "rejoin"}) == 1
    else:
        # block 3's second copy was stored again by the merge as held: its removal took it
        assert again.ingestor.references(POD) == {"gpu": {1: 1, 2: 1}, "cpu": {1: 1}}
        assert counter(again, "kvaware_blocks_skipped_total", {"reason": "rejoin"}) == 1
    again.ingest(POD, MODEL, frame(removed([3]), removed([2]), removed([1], medium="CPU")), 6)
    assert again.ingestor.references(POD) == {"gpu": {1: 1}}


def test_join_on_a_fresh_index_keeps_duplicate_copies() -> None:
    """A join replay into an index that holds nothing of the pod applies stores as they are,
    duplicate copies included."""
    history = _history()
    ix = Indexer()
    ix.ingestor.set_replay_source(BufferReplay(history[:5]))
    ix.ingest(POD, MODEL, history[5][1], 5)
    assert ix.ingestor.references(POD) == {"gpu": {1: 1, 2: 1, 3: 1}, "cpu": {1: 1}}
    assert counter(ix, "kvaware_purges_total", {"reason": "rejoin"}) == 0


# -- payloads as vLLM 0.11 published them: positional events of six fields, no lora_name ----


class _Vllm011KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class _Vllm011BlockStored(_Vllm011KVCacheEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class _Vllm011BlockRemoved(_Vllm011KVCacheEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None


def test_lora_blocks_of_vllm_0_11_are_not_keyed_as_base_model_blocks() -> None:
    """vLLM 0.11 names a request's adapter by ``lora_id`` only (no ``lora_name`` field) and
    hashes the adapter into every block: its blocks are never a prefix hit for a base-model
    request. They must not be keyed in the model's namespace (a stale hit on every pod that
    served the adapter); their continuations and removals still apply."""
    enc = msgspec.msgpack.Encoder()
    toks = list(range(2000, 2048))

    def payload(*events: Any) -> bytes:
        return enc.encode(_VllmEventBatch(1.0, list(events), 0))

    ix = Indexer()
    ix.ingest(POD, MODEL, payload(_Vllm011BlockStored([1, 2], None, toks[:32], 16, 7, "GPU")), 0)
    ix.ingest(POD, MODEL, payload(_Vllm011BlockStored([3], 2, toks[32:], 16, 7, "GPU")), 1)
    assert ix.ingestor.held(POD) == {1: 1, 2: 1, 3: 1}
    assert ix.score(MODEL, toks, [POD]) == {POD: 0.0}
    assert counter(ix, "kvaware_orphaned_blocks_total") == 0
    # the same tokens without an adapter are the model's own blocks
    ix.ingest(POD, MODEL, payload(_Vllm011BlockStored([4, 5], None, toks[:32], 16, None, "GPU")), 2)
    assert ix.score(MODEL, toks[:32], [POD]) == {POD: 1.0}
    ix.ingest(
        POD, MODEL, payload(_Vllm011BlockRemoved([3], "GPU"), _Vllm011BlockRemoved([2], "GPU")), 3
    )
    assert ix.ingestor.held(POD) == {1: 1, 4: 1, 5: 1}
    assert ix.score(MODEL, toks[:32], [POD]) == {POD: 1.0}
