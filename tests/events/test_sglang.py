"""SGLang KV events: every fixture SGLang's own radix cache and publisher produced, applied to
the index, leaves exactly the hashes SGLang's tree held (``tree_state_after``); keys derived
from those events match the keys a prompt scores with."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from kvaware_scorer import Indexer, IndexerConfig
from kvaware_scorer.events.sglang import SGLangEventDecoder

# NOTE: a copy of the payloads SGLang 0.5.23 (and 0.5.12 / 0.5.19) produced, with the manifest
# that records each step's tree state (see the fixtures' README).
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sglang-kv-events"

U64 = (1 << 64) - 1
MODEL = "Qwen/Qwen3-8B"
TIERS = {"GPU": "gpu", "CPU_PINNED": "cpu"}


def _manifest(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
    return data


def _streams(folder: Path) -> list[list[tuple[str, int, dict[str, Any]]]]:
    """The folder's frames grouped into publisher streams (a seq of 0 starts a new one)."""
    out: list[list[tuple[str, int, dict[str, Any]]]] = []
    for name, info in _manifest(folder)["files"].items():
        seq = (info.get("frames") or {}).get("seq")
        if seq is None or "tree_state_after" not in info:
            continue
        if seq == 0 or not out:
            out.append([])
        out[-1].append((name, seq, info))
    return out


def _indexer(block_size: int) -> Indexer:
    return Indexer(
        IndexerConfig.model_validate({"tokenProcessorConfig": {"blockSize": block_size}})
    )


def _held(ix: Indexer, pod: str) -> dict[str, list[int]]:
    refs = ix.ingestor.references(pod)
    return {wire: sorted(refs.get(tier, {})) for wire, tier in TIERS.items()}


def _expected(info: dict[str, Any]) -> dict[str, list[int]]:
    tree = info["tree_state_after"]
    return {wire: sorted(h & U64 for h in tree.get(wire, [])) for wire in TIERS}


FOLDERS = ["", "legacy-0.5.12", "legacy-0.5.19"]
CASES = [
    pytest.param(folder, i, id=f"{folder or '0.5.23'}-{stream[0][0].removesuffix('.msgpack')}")
    for folder in FOLDERS
    if (FIXTURES / folder / "manifest.json").is_file()
    for i, stream in enumerate(_streams(FIXTURES / folder))
]


@pytest.mark.parametrize(("folder", "stream"), CASES)
def test_index_state_equals_sglang_tree_after_every_frame(folder: str, stream: int) -> None:
    frames = _streams(FIXTURES / folder)[stream]
    page = frames[0][2]["page_size"]
    ix = _indexer(page)
    for name, seq, info in frames:
        payload = (FIXTURES / folder / name).read_bytes()
        ix.ingest("pod-a", MODEL, payload, seq=seq, engine="sglang")
        want, got = _expected(info), _held(ix, "pod-a")
        if all(len(set(hs)) == len(hs) for hs in want.values()):
            assert got == want, name
        else:
            # NOTE: 0.5.19's simulated RadixCache reports a salted insert's nodes under their
            # unsalted hashes (so one hash twice) while its publisher sends the salted chain:
            # only the number of pages held can be compared.
            assert {t: len(hs) for t, hs in got.items()} == {
                t: len(hs) for t, hs in want.items()
            }, name
    dropped = {
        s.labels["reason"]: s.value
        for metric in ix.metrics.dropped.collect()
        for s in metric.samples
        if s.name.endswith("_total") and s.value
    }
    assert dropped == {}


def test_the_vllm_decoder_would_reject_sglang_stores() -> None:
    """Guards the premise of the engine seam: without engine="sglang" the signed hashes are
    malformed for vLLM's decoder, and the index stays empty."""
    ix = _indexer(16)
    ix.ingest("pod-a", MODEL, (FIXTURES / "batch_stored.msgpack").read_bytes(), seq=1)
    assert _held(ix, "pod-a") == {"GPU": [], "CPU_PINNED": []}


def _request(name: str) -> list[int]:
    tokens: list[int] = _manifest(FIXTURES)["request_inputs"][name]
    return tokens


def test_keys_from_events_match_keys_from_the_prompt() -> None:
    ix = _indexer(16)
    for name, seq in [("batch_startup_all_cleared", 0), ("batch_stored", 1)]:
        ix.ingest("pod-a", MODEL, (FIXTURES / f"{name}.msgpack").read_bytes(), seq, "sglang")
    r1 = _request("r1")
    assert ix.score(model=MODEL, token_ids=r1, pods=["pod-a", "pod-b"]) == {
        "pod-a": 1.0,
        "pod-b": 0.0,
    }
    # r2 shares r1's first two pages only
    assert ix.score(model=MODEL, token_ids=_request("r2"), pods=["pod-a"])["pod-a"] == 0.5


def test_a_salted_store_scores_only_for_the_same_salt() -> None:
    ix = _indexer(16)
    ix.ingest(
        "pod-a", MODEL, (FIXTURES / "batch_stored_salt_session.msgpack").read_bytes(), 0, "sglang"
    )
    r1 = _request("r1")
    assert ix.score(model=MODEL, token_ids=r1, pods=["pod-a"], cache_salt="tenant-a") == {
        "pod-a": 1.0
    }
    assert ix.score(model=MODEL, token_ids=r1, pods=["pod-a"]) == {"pod-a": 0.0}


def test_lora_blocks_score_under_the_adapter_name() -> None:
    ix = _indexer(16)
    ix.ingest("pod-a", MODEL, (FIXTURES / "batch_stored_lora.msgpack").read_bytes(), 0, "sglang")
    r1 = _request("r1")
    assert ix.score(model=MODEL, token_ids=r1, pods=["pod-a"], lora_name="sql-lora") == {
        "pod-a": 1.0
    }
    assert ix.score(model=MODEL, token_ids=r1, pods=["pod-a"]) == {"pod-a": 0.0}


def test_page_size_one_is_rechunked_to_the_index_block_size() -> None:
    """Ten 1-token pages at block size 4: two complete chunks; the branch stores 3 tokens
    after a shared 6-token prefix (completing chunk 2 of the branch with carried tokens), then
    the first prompt's 4-token tail is evicted, which breaks its chunk 2."""
    ix = _indexer(4)
    short = _request("short10")
    ix.ingest("pod-a", MODEL, (FIXTURES / "batch_page1_stored.msgpack").read_bytes(), 0, "sglang")
    assert ix.score(model=MODEL, token_ids=short, pods=["pod-a"]) == {"pod-a": 1.0}
    ix.ingest(
        "pod-a",
        MODEL,
        (FIXTURES / "batch_page1_branch_and_evict.msgpack").read_bytes(),
        1,
        "sglang",
    )
    assert ix.score(model=MODEL, token_ids=short, pods=["pod-a"]) == {"pod-a": 0.5}
    branch = short[:6] + [40, 41, 42]
    assert ix.score(model=MODEL, token_ids=branch, pods=["pod-a"]) == {"pod-a": 1.0}


def test_rechunking_carries_tokens_across_stores() -> None:
    """Pages of 3 tokens at block size 4: chunk ends fall inside pages; a chunk completed by a
    later store is held by the page that completes it, and evicting that page drops it."""
    toks = list(range(100, 112))  # 12 tokens = 4 pages of 3 = 3 chunks of 4
    hashes = [-(i + 1) * 7919 for i in range(4)]  # signed, as SGLang sends them

    def stored(hs: list[int], parent: int | None, ts: list[int]) -> bytes:
        ev = {
            "type": "BlockStored",
            "block_hashes": hs,
            "parent_block_hash": parent,
            "token_ids": ts,
            "block_size": 3,
            "lora_id": None,
            "medium": "GPU",
        }
        return msgspec.msgpack.encode([time.time(), [ev], 0])

    ix = _indexer(4)
    ix.ingest("p", MODEL, stored(hashes[:1], None, toks[:3]), 0, "sglang")
    assert ix.score(model=MODEL, token_ids=toks, pods=["p"]) == {"p": 0.0}
    ix.ingest("p", MODEL, stored(hashes[1:3], hashes[0], toks[3:9]), 1, "sglang")
    assert ix.score(model=MODEL, token_ids=toks, pods=["p"])["p"] == pytest.approx(2 / 3)
    ix.ingest("p", MODEL, stored(hashes[3:], hashes[2], toks[9:]), 2, "sglang")
    assert ix.score(model=MODEL, token_ids=toks, pods=["p"]) == {"p": 1.0}
    removed = {"type": "BlockRemoved", "block_hashes": [hashes[3]], "medium": "GPU"}
    ix.ingest("p", MODEL, msgspec.msgpack.encode([time.time(), [removed], 0]), 3, "sglang")
    assert ix.score(model=MODEL, token_ids=toks, pods=["p"])["p"] == pytest.approx(2 / 3)


def test_carry_map_is_bounded() -> None:
    dec = SGLangEventDecoder(block_size=16, carry_size=8)
    for i in range(50):
        ev = {
            "type": "BlockStored",
            "block_hashes": [i + 1],
            "parent_block_hash": None,
            "token_ids": [i],
            "block_size": 1,
            "lora_id": None,
            "medium": "GPU",
        }
        dec.decode(msgspec.msgpack.encode([0.0, [ev], 0]))
    assert len(dec._carry) == 8


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # never-used msgpack byte
        msgspec.msgpack.encode({"not": "a batch"}),
        msgspec.msgpack.encode([0.0, "events", 0]),
        b"\x93\xcb" + b"\x00" * 8 + b"\x91" * 3000,  # deep nesting
        b"\x93\xcb" + b"\x00" * 8 + b"\x91\xa2\xff\xfe\x00",  # invalid UTF-8 string
    ],
)
def test_undecodable_frames_are_counted_not_raised(payload: bytes) -> None:
    ix = _indexer(16)
    ix.ingest("p", MODEL, payload, 0, "sglang")
    counted = sum(
        s.value
        for metric in ix.metrics.dropped.collect()
        for s in metric.samples
        if s.name.endswith("_total") and s.labels["reason"] in ("decode_error", "malformed_event")
    )
    assert counted >= 1


def test_malformed_events_are_rejected_one_by_one() -> None:
    good = {
        "type": "BlockStored",
        "block_hashes": [-5],
        "parent_block_hash": None,
        "token_ids": list(range(16)),
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
    }
    bad_count = dict(good, token_ids=list(range(15)))
    bad_hash = dict(good, block_hashes=["not-an-int"])
    unknown = {"type": "SomethingNew"}
    batch = SGLangEventDecoder(16).decode(
        msgspec.msgpack.encode([0.0, [bad_count, good, bad_hash, unknown], None])
    )
    assert len(batch.events) == 1
    assert batch.events[0].block_hashes == [(-5) & U64]  # type: ignore[union-attr]
    assert sorted(batch.rejected) == ["malformed_event", "malformed_event", "unknown_event_type"]
    assert batch.data_parallel_rank is None


def test_sglang_events_are_refused_in_vllm_key_mode() -> None:
    ix = Indexer(IndexerConfig.model_validate({"tokenProcessorConfig": {"keyMode": "vllm"}}))
    ix.ingest("p", MODEL, (FIXTURES / "batch_stored.msgpack").read_bytes(), 1, "sglang")
    assert _held(ix, "p") == {"GPU": [], "CPU_PINNED": []}


def test_unknown_engine_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown KV-event engine 'trtllm'"):
        _indexer(16).ingest("p", MODEL, b"", 0, "trtllm")


def test_a_live_sglang_publisher_over_zmq_feeds_the_index() -> None:
    """A PUB socket sending SGLang's frames as its publisher does (topic kv@pod@model, 8-byte
    seq, payload) to a subscriber configured for an sglang endpoint."""
    from kvaware_scorer.events.subscriber import KVEventSubscriber

    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    ix = _indexer(16)
    sub = KVEventSubscriber(ix, {})
    try:
        sub.add_endpoint("10.9.9.9:8000", f"tcp://127.0.0.1:{port}", model=MODEL, engine="sglang")
        sub.start()
        frames = ["batch_startup_all_cleared", "batch_stored", "batch_stored_with_parent"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for seq, name in enumerate(frames):
                payload = (FIXTURES / f"{name}.msgpack").read_bytes()
                pub.send_multipart(
                    [b"kv@10.9.9.9:8000@" + MODEL.encode(), seq.to_bytes(8, "big"), payload]
                )
            time.sleep(0.2)
            if len(_held(ix, "10.9.9.9:8000")["GPU"]) == 6:
                break
        assert _held(ix, "10.9.9.9:8000") == _expected(
            _manifest(FIXTURES)["files"]["batch_stored_with_parent.msgpack"]
        )
    finally:
        sub.stop()
        pub.close(linger=0)


@pytest.mark.parametrize(
    ("scorer_events", "endpoint_kw"),
    [
        pytest.param({"engineType": "sglang"}, {}, id="engineType"),
        pytest.param({}, {"engine": "sglang"}, id="endpoint-engine"),
        pytest.param({}, {"labels": {"llm-d.ai/engine-type": "sglang"}}, id="pod-label"),
    ],
)
def test_the_precise_scorer_reads_an_sglang_pod(
    scorer_events: dict[str, Any], endpoint_kw: dict[str, Any]
) -> None:
    """The scheduler's precise scorer dials an SGLang pod's publisher and scores its prefix:
    the engine comes from upstream's ``engineType``, the endpoint's ``engine`` or the pod's
    ``llm-d.ai/engine-type`` label."""
    from kvaware_scorer.scheduler import Endpoint, Scheduler, make_plugin_manager
    from kvaware_scorer.scheduler.types import SchedulingRequest

    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    params: dict[str, Any] = {"speculativeIndexing": False}
    if scorer_events:
        params["kvEventsConfig"] = scorer_events
    cfg = {
        "apiVersion": "inference.networking.x-k8s.io/v1alpha1",
        "kind": "EndpointPickerConfig",
        "plugins": [
            {"type": "precise-prefix-cache-scorer", "parameters": params},
            {"type": "max-score-picker"},
        ],
        "schedulingProfiles": [
            {
                "name": "default",
                "plugins": [
                    {"pluginRef": "precise-prefix-cache-scorer"},
                    {"pluginRef": "max-score-picker"},
                ],
            }
        ],
    }
    s = Scheduler.from_config(cfg, plugin_manager=make_plugin_manager(use_env=False))
    a = Endpoint(
        "a", "127.0.0.1", 8001, kv_events=f"tcp://127.0.0.1:{port}", model=MODEL, **endpoint_kw
    )
    b = Endpoint("b", "127.0.0.1", 8002, model=MODEL)
    s.set_endpoints([a, b])
    s.start()
    r1 = _request("r1")
    try:
        deadline = time.monotonic() + 10
        scores: dict[str, float] = {}
        while time.monotonic() < deadline:
            for seq, name in enumerate(["batch_startup_all_cleared", "batch_stored"]):
                payload = (FIXTURES / f"{name}.msgpack").read_bytes()
                pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
            time.sleep(0.2)
            result = s.schedule(SchedulingRequest(request_id="r", model=MODEL, token_ids=r1))
            scores = result.scores["precise-prefix-cache-scorer"]
            if scores.get(a.id) == 1.0:
                break
        assert scores == {a.id: 1.0, b.id: 0.0}
    finally:
        s.stop()
        pub.close(linger=0)


def test_events_decode_reads_sglang_payloads(capsys: pytest.CaptureFixture[str]) -> None:
    from kvaware_scorer.cli import main

    path = FIXTURES / "batch_stored.msgpack"
    assert main(["events", "decode", "--engine", "sglang", str(path)]) == 0
    line = json.loads(capsys.readouterr().out)
    (ev,) = line["events"]
    want = _manifest(FIXTURES)["files"]["batch_stored.msgpack"]["batch"]["events"][0]
    assert ev["block_hashes"] == [h["hex"] for h in want["block_hashes"]]
    assert line["rejected"] == []
    # vLLM's decoder rejects the same store (signed hashes)
    assert main(["events", "decode", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["rejected"] == ["malformed_event"]
