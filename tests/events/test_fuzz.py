"""Fuzzing ingestion: mutated and random payloads never raise and every rejection is counted."""

from __future__ import annotations

import copy
import random
from typing import Any

import msgspec

from kvaware_scorer import Indexer
from kvaware_scorer.events.ingest import ReplayResult
from tests.events.conftest import EVENTS_DIR, LEGACY_DIR

GEN = msgspec.msgpack.Decoder()
RAW_LIST = msgspec.msgpack.Decoder(list[msgspec.Raw])
ENC = msgspec.msgpack.Encoder()

#: Reasons that reject one event (the others reject a whole frame).
EVENT_REASONS = {
    "malformed_event",
    "unknown_event_type",
    "token_count_mismatch",
    "block_size_mismatch",
    "no_model",
    "orphaned_parent",
    "bad_tier",
    "backend_error",
}
ATOMS: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    7,
    16,
    2**31,
    2**63,
    2**64 - 1,
    -(2**63),
    0.5,
    float("nan"),
    float("inf"),
    "",
    "GPU",
    "cpu",
    "Storage",
    "BlockStored",
    "BlockRemoved",
    "AllBlocksCleared",
    "x" * 300,
    b"",
    b"\x01",
    b"\xab" * 32,
    [],
    {},
    [None],
    [[1, 2]],
    {"type": "BlockStored"},
    {"type": "BlockRemoved", "block_hashes": [1]},
    ["BlockRemoved", [1], "GPU"],
    msgspec.msgpack.Ext(5, b"ext"),
]


def frame_shape(payload: bytes) -> int | None:
    """How many events an EventBatch-shaped payload carries; None when it is not one."""
    try:
        parts = RAW_LIST.decode(payload)
        if len(parts) < 2:
            return None
        ts = GEN.decode(parts[0])
        if type(ts) not in (int, float):
            return None
        if len(parts) >= 3:
            rank = GEN.decode(parts[2])
            if rank is not None and (type(rank) is not int or rank < 0):
                return None
        return len(RAW_LIST.decode(parts[1]))
    except (msgspec.DecodeError, ValueError):
        return None


def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, (*prefix, i))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k))
    return out


def get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def mutate_tree(rng: random.Random, obj: Any) -> Any:
    obj = copy.deepcopy(obj)
    for _ in range(rng.randint(1, 4)):
        all_paths = paths(obj)
        path = rng.choice(all_paths)
        if not path:
            return rng.choice(ATOMS) if rng.random() < 0.3 else obj
        parent, key = get(obj, path[:-1]), path[-1]
        op = rng.random()
        if op < 0.45:
            parent[key] = copy.deepcopy(rng.choice(ATOMS))
        elif (op < 0.6 and isinstance(parent, dict)) or (op < 0.7 and isinstance(parent, list)):
            del parent[key]
        elif op < 0.8 and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        elif op < 0.9 and isinstance(parent, dict):
            parent[f"unknown_{rng.randrange(9)}"] = rng.choice(ATOMS)
        elif isinstance(parent[key], int) and not isinstance(parent[key], bool):
            v = rng.choice([parent[key] + 1, -parent[key], parent[key] * 16, 0])
            parent[key] = v if -(2**63) <= v < 2**64 else 2**64 - 1
        else:
            parent[key] = copy.deepcopy(rng.choice(ATOMS))
    return obj


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    op = rng.random()
    if op < 0.3 and b:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif op < 0.5:
        b = b[: rng.randrange(len(b) + 1)]
    elif op < 0.7 and b:
        i = rng.randrange(len(b))
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif op < 0.85 and b:
        b[rng.randrange(len(b))] = rng.choice([0xC0, 0xC1, 0xCF, 0xDC, 0xDE, 0x90, 0x80, 0xFF])
    else:
        b = bytearray(rng.randbytes(rng.randint(0, 64)))
    return bytes(b)


def random_obj(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth > 3 or r < 0.4:
        return rng.choice(ATOMS)
    if r < 0.75:
        return [random_obj(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["type", "block_hashes", "medium", "x"]): random_obj(rng, depth + 1)
            for _ in range(rng.randint(0, 3))}  # fmt: skip


def synthetic(rng: random.Random, known: list[int]) -> Any:
    """A structurally valid batch with random (often nonsensical) values."""
    events: list[Any] = []
    for _ in range(rng.randint(0, 5)):
        kind = rng.random()
        n = rng.randint(0, 4)
        hashes = [rng.choice(known) if known and rng.random() < 0.5 else rng.getrandbits(64)
                  for _ in range(n)]  # fmt: skip
        medium = rng.choice(["GPU", "cpu", None, "disk", f"tier{rng.randrange(30)}"])
        if kind < 0.6:
            bs = rng.choice([16, 16, 32, 8, 0, 5])
            ntok = n * bs if rng.random() < 0.85 else rng.randint(0, 70)
            extra = rng.choice(
                [None, [None] * n, [["lora"]] * n, [[["mm", 0]]] + [None] * (n - 1), [["salt"]]]
            )
            events.append(
                {
                    "type": "BlockStored",
                    "block_hashes": hashes,
                    "parent_block_hash": rng.choice([None, rng.getrandbits(64), *known[-3:]]),
                    "token_ids": [rng.randrange(1000) for _ in range(ntok)],
                    "block_size": bs,
                    "lora_id": None,
                    "medium": medium,
                    "lora_name": rng.choice([None, "lora"]),
                    "extra_keys": extra,
                    "group_idx": rng.choice([0, 0, 1, None]),
                    "kv_cache_spec_kind": rng.choice(
                        ["full_attention", None, "sliding_window", "mamba", "mla_attention"]
                    ),
                }
            )
            known.extend(hashes)
        elif kind < 0.95:
            events.append({"type": "BlockRemoved", "block_hashes": hashes, "medium": medium,
                           "group_idx": rng.choice([0, 1, None])})  # fmt: skip
        else:
            events.append({"type": "AllBlocksCleared"})
    del known[:-64]
    return [rng.random() * 1e9, events, rng.choice([0, 0, 1, None])]


def counts(ix: Indexer) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for family in (ix.metrics.dropped, ix.metrics.events):
        for metric in family.collect():
            for s in metric.samples:
                if s.name.endswith("_total"):
                    out[(metric.name, next(iter(s.labels.values())))] = s.value
    return out


def test_fuzzed_payloads_never_raise_and_every_rejection_is_counted() -> None:
    """12,000 mutated, random and synthetic payloads: no exception escapes or is swallowed as
    an internal error, and every event is either applied or counted as dropped by reason."""
    rng = random.Random(20240611)
    seeds: list[Any] = []
    for directory in (EVENTS_DIR, LEGACY_DIR):
        for path in sorted(directory.glob("*.msgpack")):
            seeds.append(GEN.decode(path.read_bytes()))
    raw_seeds = [ENC.encode(s) for s in seeds]
    ix = Indexer({"kvBlockIndexConfig": {"inMemoryConfig": {"size": 5000}}})
    pods = ["10.0.0.1:8000", "10.0.0.2:8000", "p:3"]
    seqs = dict.fromkeys(pods, 0)
    known: list[int] = []
    stats = {"decode_error": 0, "events": 0, "dropped_events": 0}
    total = 12_000
    before = counts(ix)
    for i in range(total):
        r = rng.random()
        if r < 0.3:
            payload = ENC.encode(mutate_tree(rng, rng.choice(seeds)))
        elif r < 0.5:
            payload = mutate_bytes(rng, rng.choice(raw_seeds))
        elif r < 0.6:
            payload = ENC.encode(random_obj(rng))
        elif r < 0.85:
            payload = ENC.encode(synthetic(rng, known))
        else:
            payload = ENC.encode(mutate_tree(rng, synthetic(rng, known)))
        pod = rng.choice(pods)
        s = rng.random()
        seq: int | None
        if s < 0.3:
            seq = None
        else:
            step = rng.choice([1, 1, 1, 2, 5, 0, -3]) if s < 0.98 else -seqs[pod]
            seqs[pod] = max(0, seqs[pod] + step)
            seq = seqs[pod]
        ix.ingest(pod, rng.choice([None, "m", "m"]), payload, seq)
        after = counts(ix)
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        before = after
        dropped = {k[1]: v for k, v in delta.items() if k[0] == "kvaware_dropped_messages" and v}
        applied = sum(v for k, v in delta.items() if k[0] == "kvaware_events")
        assert "internal_error" not in dropped, (i, payload)
        n_events = frame_shape(payload)
        event_drops = sum(v for k, v in dropped.items() if k in EVENT_REASONS)
        if n_events is None:
            assert dropped == {"decode_error": 1} and applied == 0, (i, payload, delta)
            stats["decode_error"] += 1
        else:
            assert "decode_error" not in dropped, (i, payload)
            assert applied + event_drops == n_events, (i, payload, delta, n_events)
            stats["events"] += int(applied)
            stats["dropped_events"] += int(event_drops)
    # every outcome was exercised, and the index is still usable
    assert stats["decode_error"] > 1000 and stats["events"] > 5000
    assert stats["dropped_events"] > 1000
    assert ix.index.stats().entries >= 0
    ix.score("m", list(range(64)), pods)


class FuzzReplay:
    """A replay source answering with random mixes of valid, garbage and misnumbered frames."""

    def __init__(self, rng: random.Random, known: list[int]) -> None:
        self.rng = rng
        self.known = known
        self.calls = 0

    def replay(self, pod: str, rank: int, start_seq: int, reason: str) -> ReplayResult | None:
        rng = self.rng
        self.calls += 1
        if rng.random() < 0.1:
            return None
        if rng.random() < 0.05:
            raise RuntimeError("replay transport failure")
        frames = []
        seq = start_seq + rng.choice([0, 0, 1, -1])
        for _ in range(rng.randint(0, 6)):
            batch = synthetic(rng, self.known)
            if rng.random() < 0.3:
                payload = mutate_bytes(rng, ENC.encode(batch))
            else:
                batch[2] = rank if rng.random() < 0.9 else rank + 1
                payload = ENC.encode(batch)
            frames.append((max(0, seq), payload))
            seq += rng.choice([1, 1, 1, 2, 0])
        return ReplayResult(frames, rng.choice(["ok", "ok", "timeout", "error", "truncated"]))


def test_fuzzed_replays_and_sequences_never_raise() -> None:
    """Random gaps, restarts and joins answered by garbage replays never raise nor end as
    internal errors, and every gap is either recovered or counted as lost."""
    rng = random.Random(7)
    known: list[int] = []
    ix = Indexer()
    source = FuzzReplay(rng, known)
    ix.ingestor.set_replay_source(source)
    seq = 0
    for _ in range(3000):
        seq = max(0, seq + rng.choice([1, 1, 1, 3, 7, -2, 0]))
        rank = rng.choice([0, 0, 1])
        batch = synthetic(rng, known)
        batch[2] = rank
        ix.ingest(rng.choice(["a:1", "b:1"]), "m", ENC.encode(batch), seq)
    reg = ix.metrics.registry
    assert not reg.get_sample_value("kvaware_dropped_messages_total", {"reason": "internal_error"})
    assert source.calls > 500
    assert (reg.get_sample_value("kvaware_lost_batches_total") or 0) > 0
    assert (reg.get_sample_value("kvaware_replayed_batches_total", {"reason": "gap"}) or 0) > 0
    assert (
        reg.get_sample_value("kvaware_dropped_messages_total", {"reason": "rank_mismatch"}) or 0
    ) > 0
