"""Workloads: shared-prefix shape, load stages, multi-turn growth and the Mooncake trace loader."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.sim.workloads import (
    UPSTREAM_LADDER,
    LoadStage,
    MultiTurnWorkload,
    SharedPrefixWorkload,
    TraceWorkload,
    arrival_times,
    load_mooncake,
    parse_stages,
)

TRACE = (
    Path(__file__).resolve().parents[2] / "benchmarks" / "traces" / "mooncake_synthetic_trace.jsonl"
)


def test_upstream_ladder_is_the_73_capacity_one() -> None:
    """The default ladder is upstream's: warm-up 15 req/s x 50 s, then 3 -> 60 req/s, 502 s."""
    assert UPSTREAM_LADDER[0] == LoadStage(15, 50)
    assert [s.rate for s in UPSTREAM_LADDER[1:]][:3] == [3, 10, 15]
    assert UPSTREAM_LADDER[-1] == LoadStage(60, 25)
    assert sum(s.duration for s in UPSTREAM_LADDER) == 502


def test_parse_stages_and_errors() -> None:
    """rate:duration lists parse; malformed or non-positive entries name the offending stage."""
    assert parse_stages("3:20, 10:5") == [LoadStage(3, 20), LoadStage(10, 5)]
    with pytest.raises(ConfigError, match=r"stages\[1\]"):
        parse_stages("3:20,oops")
    with pytest.raises(ConfigError, match=r"stages\[0\]"):
        parse_stages("0:20")


def test_arrival_processes_follow_the_stage_rates() -> None:
    """Constant arrivals are evenly spaced; Poisson counts are close to rate x duration per stage."""
    stages = [LoadStage(4, 10), LoadStage(40, 10)]
    const = list(arrival_times(stages, "constant", np.random.default_rng(0)))
    assert len(const) == 440 and const[1][0] - const[0][0] == pytest.approx(0.25)
    assert const[40] == (10.0, 1)
    pois = list(arrival_times([LoadStage(50, 100)], "poisson", np.random.default_rng(1)))
    assert 4700 < len(pois) < 5300
    assert all(a[0] < b[0] for a, b in itertools.pairwise(pois))
    with pytest.raises(ConfigError):
        list(arrival_times(stages, "bursty", np.random.default_rng(0)))


def test_shared_prefix_prompts_share_group_system_prompts_and_cycle() -> None:
    """groups x prompts distinct prompts; same group = same system prompt; request i uses i % N."""
    wl = SharedPrefixWorkload(
        num_groups=4,
        num_prompts_per_group=3,
        system_prompt_len=100,
        question_len=20,
        output_len=7,
        load=[LoadStage(100, 1)],
        arrival="constant",
        vocab_size=1000,
        seed=3,
    )
    reqs = list(wl.requests())
    assert len(reqs) == 100 and wl.expected_requests() == 100
    assert all(r.num_prompt_tokens == 120 and r.max_tokens == 7 for r in reqs)
    assert (
        np.array_equal(reqs[0].prompt, reqs[12].prompt)
        and reqs[0].prompt_key == reqs[12].prompt_key
    )
    assert len({r.prompt_key for r in reqs}) == 12
    by_group: dict[str | None, set[bytes]] = {}
    for r in reqs[:12]:
        by_group.setdefault(r.session, set()).add(r.prompt[:100].tobytes())
    assert len(by_group) == 4 and all(len(v) == 1 for v in by_group.values())
    again = [
        r.prompt.tobytes()
        for r in SharedPrefixWorkload(
            num_groups=4,
            num_prompts_per_group=3,
            system_prompt_len=100,
            question_len=20,
            output_len=7,
            load=[LoadStage(100, 1)],
            arrival="constant",
            vocab_size=1000,
            seed=3,
        ).requests()
    ]
    assert again == [r.prompt.tobytes() for r in reqs]


def test_multi_turn_prompt_is_previous_prompt_plus_answer_plus_message() -> None:
    """Turn k+1's prompt extends turn k's prompt with its answer and a new user message."""
    wl = MultiTurnWorkload(
        load=[LoadStage(1, 2)],
        num_system_prompts=1,
        system_prompt_len=50,
        turns=3,
        user_message_len=10,
        answer_len=5,
        think_time_s=2.0,
        arrival="constant",
        vocab_size=500,
    )
    first = list(wl.requests())
    assert len(first) == 2 and wl.expected_requests() == 6
    r0 = first[0]
    (r1,) = wl.on_complete(r0, now=10.0)
    assert r1.session == r0.session and r1.turn == 1 and r1.arrival_time >= 10.0
    assert r1.num_prompt_tokens == 50 + 10 + 5 + 10
    assert np.array_equal(r1.prompt[:65], np.concatenate((r0.prompt, r0.output_tokens)))
    (r2,) = wl.on_complete(r1, now=20.0)
    assert np.array_equal(
        r2.prompt[: r1.num_prompt_tokens + 5], np.concatenate((r1.prompt, r1.output_tokens))
    )
    assert wl.on_complete(r2, now=30.0) == []
    assert np.array_equal(first[1].prompt[:50], r0.prompt[:50])  # one shared system prompt


def test_mooncake_loader_reads_the_real_trace() -> None:
    """The bundled Mooncake trace loads: 3,993 rows, ms timestamps, 512-token hash_id blocks."""
    rows = load_mooncake(TRACE)
    assert len(rows) == 3993
    assert rows[0].timestamp_ms == 0 and rows[-1].timestamp_ms == pytest.approx(1022025)
    assert all(len(r.hash_ids) == -(-r.input_length // 512) for r in rows)
    wl = TraceWorkload(TRACE, max_requests=50, vocab_size=151936)
    reqs = list(wl.requests())
    assert len(reqs) == 50
    assert [r.num_prompt_tokens for r in reqs] == [r.input_length for r in rows[:50]]
    assert [r.max_tokens for r in reqs] == [max(1, r.output_length) for r in rows[:50]]
    assert reqs[2].arrival_time == pytest.approx(0.040)


def test_same_hash_id_gives_the_same_block_tokens() -> None:
    """Two rows sharing leading hash_ids share exactly those blocks' tokens; the tail is cut."""
    wl = TraceWorkload(TRACE)
    rows = wl.rows()
    a, b = next(
        (x, y)
        for i, x in enumerate(rows)
        for y in rows[i + 1 : i + 200]
        if x.hash_ids[:2] == y.hash_ids[:2]
        and len(x.hash_ids) > 2
        and len(y.hash_ids) > 2
        and x.hash_ids[2] != y.hash_ids[2]
    )
    pa, pb = wl.prompt_tokens(a), wl.prompt_tokens(b)
    assert np.array_equal(pa[:1024], pb[:1024])
    assert not np.array_equal(pa[1024:1536], pb[1024:1536])
    assert len(pa) == a.input_length and pa.min() >= 0 and pa.max() < 151936


def test_mooncake_loader_errors_name_the_line(tmp_path: Path) -> None:
    """Malformed rows raise ConfigError naming file and line; too few hash_ids are refused."""
    good = '{"timestamp": 5, "input_length": 600, "output_length": 3, "hash_ids": [1, 2]}'
    cases = {
        "not JSON": "oops",
        "missing field 'hash_ids'": '{"timestamp": 1, "input_length": 3, "output_length": 1}',
        "cover at most 512": '{"timestamp": 1, "input_length": 600, "output_length": 1, "hash_ids": [1]}',
        "timestamp must be": '{"timestamp": -1, "input_length": 3, "output_length": 1, "hash_ids": [1]}',
    }
    for message, bad in cases.items():
        f = tmp_path / "t.jsonl"
        f.write_text(good + "\n\n" + bad + "\n")
        with pytest.raises(ConfigError, match=message) as info:
            load_mooncake(f)
        assert "t.jsonl:3" in str(info.value)
    f = tmp_path / "ok.jsonl"
    f.write_text(
        '{"timestamp": 9, "input_length": 10, "output_length": 0, "hash_ids": [4, 5]}\n' + good
    )
    rows = load_mooncake(f)
    assert [r.timestamp_ms for r in rows] == [5, 9] and rows[1].hash_ids == (4,)
    with pytest.raises(ConfigError, match="cannot read"):
        load_mooncake(tmp_path / "missing.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"timestamp": 0, "note": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match="cannot read"):
        load_mooncake(tmp_path / "latin1.jsonl")


def test_multi_turn_content_does_not_depend_on_completion_order() -> None:
    """Each session's messages, answers and think times are the same whichever order the turns
    complete in (so every router is offered the very same conversations)."""

    def make() -> MultiTurnWorkload:
        return MultiTurnWorkload(
            load=[LoadStage(2, 2)],
            num_system_prompts=2,
            system_prompt_len=20,
            turns=3,
            user_message_len=8,
            answer_len=4,
            think_time_s=1.0,
            vocab_size=1000,
            seed=5,
        )

    def play(order: list[int]) -> dict[str, tuple[float, bytes, bytes]]:
        wl = make()
        source = wl.requests()
        first = [next(source), next(source)]
        seen: dict[str, tuple[float, bytes, bytes]] = {}
        current = list(first)
        for i in order:
            (nxt,) = wl.on_complete(current[i], now=10.0)
            seen[nxt.request_id] = (
                nxt.arrival_time,
                nxt.prompt.tobytes(),
                nxt.output_tokens.tobytes(),
            )
            current[i] = nxt
        for r in [*first, *source]:
            seen[r.request_id] = (r.arrival_time, r.prompt.tobytes(), r.output_tokens.tobytes())
        return seen

    assert play([0, 0, 1, 1]) == play([1, 0, 1, 0])


def test_mooncake_loader_accepts_any_file_of_the_format(tmp_path: Path) -> None:
    """A byte-order mark, CRLF line ends, blank lines and extra fields are all accepted."""
    f = tmp_path / "t.jsonl"
    rows = [
        '{"timestamp": 12.5, "input_length": 700, "output_length": 4, "hash_ids": [7, 8],'
        ' "session_id": "a", "type": "chat"}',
        "   ",
        '{"hash_ids": [7], "output_length": 1, "input_length": 3, "timestamp": 0, "x": null}',
    ]
    f.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n\r\n")
    loaded = load_mooncake(f)
    assert [(r.timestamp_ms, r.input_length, r.hash_ids) for r in loaded] == [
        (0.0, 3, (7,)),
        (12.5, 700, (7, 8)),
    ]
