"""Engine: vLLM v1 scheduling (chunked prefill, budget, FCFS, preemption) and its KV events."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from kvaware_scorer.sim.engine import RequestStatus
from kvaware_scorer.sim.wire import BlockRemoved, BlockStored

from .helpers import make_engine, make_request, step


def test_chunked_prefill_announces_chunk_by_chunk_with_chained_parents() -> None:
    """A 200-token prompt under a 64-token budget is stored 4 blocks per step, each chained."""
    engine, hasher = make_engine(64, 16, max_num_batched_tokens=64)
    req = make_request("long", np.arange(1, 201), 3, hasher)
    er = engine.add_request(req)
    stores: list[BlockStored] = []
    first_token_step = None
    for k in range(4):
        out = step(engine, float(k))
        stores += [e for e in out.events if isinstance(e, BlockStored)]
        if out.first_tokens:
            first_token_step = k
    assert first_token_step == 3  # 64 + 64 + 64 + 8 tokens
    assert [len(s.block_hashes) for s in stores] == [4, 4, 4]
    assert stores[0].parent_block_hash is None
    assert stores[1].parent_block_hash == stores[0].block_hashes[-1]
    assert stores[2].parent_block_hash == stores[1].block_hashes[-1]
    assert [t for s in stores for t in s.token_ids] == list(range(1, 193))
    assert [h for s in stores for h in s.block_hashes] == er.block_hashes[:12]


def test_running_decodes_are_scheduled_before_new_prefill() -> None:
    """Decoding requests take one token each from the budget before a waiting prefill is admitted."""
    engine, hasher = make_engine(64, 16, max_num_batched_tokens=32)
    engine.add_request(make_request("a", np.arange(1, 17), 10, hasher))
    step(engine)
    engine.add_request(make_request("b", np.arange(100, 160), 2, hasher))
    engine.begin_step(1.0)
    scheduled = {r.request_id: n for r, n in engine._scheduled}
    engine.finish_step(1.1)
    assert scheduled == {"a": 1, "b": 31}


def test_prefix_hit_is_full_blocks_capped_at_prompt_length_minus_one() -> None:
    """A resend hits all but the last block; a longer prompt over the same blocks hits all of them."""
    engine, hasher = make_engine(64, 16)
    prompt = list(range(1, 65))
    engine.add_request(make_request("a", prompt, 1, hasher))
    step(engine)
    er_b = engine.add_request(make_request("b", prompt, 1, hasher))
    step(engine)
    er_c = engine.add_request(make_request("c", prompt + [7, 8, 9], 1, hasher))
    out = step(engine)
    assert er_b.num_cached_tokens == 48
    assert er_c.num_cached_tokens == 64
    assert out.events == []  # c stores nothing: its 67 tokens fill no new block
    # vllm:prompt_tokens counts whole prompts (cached part included), prompt_tokens_cached hits.
    assert (engine.stats.prompt_tokens, engine.stats.prompt_tokens_cached) == (195, 112)
    assert (engine.stats.prefix_queries, engine.stats.prefix_hits) == (195, 112)


def test_preemption_by_recompute_frees_tail_first_and_resumes_with_hits() -> None:
    """Out of blocks, the latest running request is preempted, requeued first, and later resumes."""
    # 9 usable blocks of 4 tokens; two requests of 12-token prompts generating 12 tokens each.
    engine, hasher = make_engine(10, 4)
    a = engine.add_request(make_request("a", np.arange(1, 13), 12, hasher))
    b = engine.add_request(make_request("b", np.arange(100, 112), 12, hasher))
    saw_preempt = False
    removed: list[int] = []
    for k in range(100):
        if not engine.has_work():
            break
        out = step(engine, float(k))
        removed += [h for e in out.events if isinstance(e, BlockRemoved) for h in e.block_hashes]
        if b.status is RequestStatus.PREEMPTED and not saw_preempt:
            saw_preempt = True
            assert engine.waiting[0] is b and b.blocks == [] and b.num_computed_tokens == 0
            assert engine.running == [a]
    assert saw_preempt and engine.stats.preemptions >= 1
    assert a.status is RequestStatus.FINISHED and b.status is RequestStatus.FINISHED
    assert a.num_output_tokens == 12 and b.num_output_tokens == 12
    assert b.num_cached_tokens == 0  # first admission had no hit; resumes do not rewrite it
    assert b.preemptions >= 1 and a.preemptions == 0
    # b's resume hit its own blocks that were still cached; vLLM counts resumes apart from the
    # prefix-cache metrics, whose queries are the two first admissions only.
    stats = engine.stats
    assert stats.preempted_prefix_hits > 0 and stats.preempted_prefix_queries > 12
    assert (stats.prefix_queries, stats.prefix_hits) == (24, 0)
    assert (stats.prompt_tokens, stats.prompt_tokens_cached) == (24, 0)


def test_max_num_seqs_and_fcfs_head_of_line() -> None:
    """Admission stops at max_num_seqs, and a head request that does not fit blocks those behind."""
    engine, hasher = make_engine(64, 16, max_num_seqs=2)
    for i in range(3):
        engine.add_request(make_request(f"r{i}", np.arange(1 + 100 * i, 17 + 100 * i), 5, hasher))
    step(engine)
    assert [r.request_id for r in engine.running] == ["r0", "r1"]
    assert [r.request_id for r in engine.waiting] == ["r2"]
    small, hasher2 = make_engine(10, 16)  # 9 usable blocks
    small.add_request(make_request("a", np.arange(1, 97), 20, hasher2))  # 6 blocks
    step(small)
    small.add_request(make_request("big", np.arange(200, 264), 1, hasher2))  # 4 blocks > 3 free
    small.add_request(make_request("tiny", np.arange(1000, 1010), 1, hasher2))  # 1 block
    step(small)
    assert [r.request_id for r in small.running] == ["a"]
    assert [r.request_id for r in small.waiting] == ["big", "tiny"]


def test_validate_rejects_requests_beyond_max_model_len() -> None:
    """Prompt plus max_tokens beyond max_model_len is a 400, and add_request refuses it."""
    engine, hasher = make_engine(64, 16, max_model_len=100)
    ok = make_request("ok", np.arange(1, 91), 10, hasher)
    bad = make_request("bad", np.arange(1, 92), 10, hasher)
    assert engine.validate(ok) is None
    assert "maximum context length" in (engine.validate(bad) or "")
    with pytest.raises(ValueError):
        engine.add_request(bad)


def test_event_stream_reproduces_the_pool() -> None:
    """Applying every emitted store/remove (reference-counted) yields exactly the pool's cache."""
    rng = np.random.default_rng(7)
    engine, hasher = make_engine(30, 8, max_num_batched_tokens=48)
    prefixes = [rng.integers(0, 1000, size=40) for _ in range(3)]
    held: Counter[int] = Counter()
    n = 0
    for k in range(2000):
        if n < 60:
            p = np.concatenate(
                (prefixes[n % 3], rng.integers(0, 1000, size=int(rng.integers(1, 30))))
            )
            engine.add_request(make_request(f"q{n}", p, int(rng.integers(30, 80)), hasher))
            n += 1
        if not engine.has_work():
            continue
        for ev in step(engine, float(k)).events:
            if isinstance(ev, BlockStored):
                held.update(ev.block_hashes)  # type: ignore[arg-type]
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    held[h] -= 1  # type: ignore[index]
                    if held[h] == 0:  # type: ignore[index]
                        del held[h]  # type: ignore[arg-type]
    assert not engine.has_work() and n == 60
    assert engine.stats.preemptions > 0 and engine.pool.evictions > 0
    assert dict(held) == engine.pool.cached_hashes()


def test_step_protocol_is_enforced() -> None:
    """begin_step twice or finish_step without a step is a RuntimeError."""
    engine, _ = make_engine(8, 16)
    with pytest.raises(RuntimeError):
        engine.finish_step(0.0)
    engine.begin_step(0.0)
    with pytest.raises(RuntimeError):
        engine.begin_step(0.0)
