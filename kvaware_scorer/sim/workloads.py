"""Workloads: who sends which prompts when (shared-prefix, multi-turn chat, Mooncake trace replay).

A workload yields `SimRequest`s in arrival order and may add follow-up requests when one
completes (the next turn of a conversation). Load is given as stages of a rate and a duration,
with Poisson or constant arrivals inside each stage, as in inference-perf's ``load.stages``.

* ``shared-prefix`` follows inference-perf's ``shared_prefix`` data generator (used by the
  upstream llm-d benchmarks): ``num_groups`` random system prompts, ``num_prompts_per_group``
  random questions per group, prompt = system prompt + question, the ``groups x prompts`` prompts
  shuffled once and then sent in a cycle, fixed output length (generation ignores EOS).
* ``multi-turn`` chat: sessions start at the stage rate; each turn's prompt is the previous
  prompt + the previous answer + a new user message; the next turn is sent a think time after
  the previous answer completes. Sessions share one of a few system prompts.
* ``trace`` replays a Mooncake-format JSONL file: ``timestamp`` (ms), ``input_length``,
  ``output_length`` and ``hash_ids`` (one per 512-token block; equal ids mean equal blocks; the
  last block is cut to ``input_length``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.sim.request import SimRequest

__all__ = [
    "QUICK_LADDER",
    "UPSTREAM_LADDER",
    "LoadStage",
    "MooncakeRow",
    "MultiTurnWorkload",
    "SharedPrefixWorkload",
    "StageWindow",
    "TraceWorkload",
    "Workload",
    "arrival_times",
    "load_mooncake",
    "parse_stages",
]


@dataclass(frozen=True, slots=True)
class LoadStage:
    """A constant offered load: `rate` arrivals per second for `duration` seconds."""

    rate: float
    duration: float


@dataclass(frozen=True, slots=True)
class StageWindow:
    """A stage placed on the timeline (for reports).

    Attributes:
        index: Stage number.
        name: Label (``warmup`` for a cache-seating stage, else ``qps=<rate>``).
        rate: Offered arrivals per second (0 when unknown, e.g. trace windows).
        start: Virtual start time (s).
        end: Virtual end time (s).
        warmup: Excluded from the overall summary.
    """

    index: int
    name: str
    rate: float
    start: float
    end: float
    warmup: bool = False

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.end - self.start


#: The upstream ``73-capacity`` ladder (llm-d kv-cache-manager ``benchmarking/73-capacity``,
#: inference-perf ``load.type: poisson``): a warm-up of 15 req/s for 50 s, then 3 -> 60 req/s.
UPSTREAM_LADDER: tuple[LoadStage, ...] = (
    LoadStage(15, 50),
    LoadStage(3, 20),
    LoadStage(10, 20),
    LoadStage(15, 20),
    LoadStage(20, 38),
    LoadStage(22, 34),
    LoadStage(25, 30),
    LoadStage(30, 25),
    LoadStage(35, 21),
    LoadStage(40, 38),
    LoadStage(43, 36),
    LoadStage(46, 33),
    LoadStage(49, 30),
    LoadStage(52, 29),
    LoadStage(55, 27),
    LoadStage(57, 26),
    LoadStage(60, 25),
)

#: The ``--quick`` ladder: the same warm-up (one full set of prompts seats the caches), then a
#: few short rungs spanning the same 3 -> 60 req/s range.
QUICK_LADDER: tuple[LoadStage, ...] = (
    LoadStage(15, 50),
    LoadStage(3, 10),
    LoadStage(15, 10),
    LoadStage(30, 10),
    LoadStage(60, 10),
)


def parse_stages(text: str) -> list[LoadStage]:
    """Parse ``"rate:duration,rate:duration,..."`` (e.g. ``"15:50,3:20,10:20"``).

    Raises:
        ConfigError: Malformed text, or a non-positive rate or duration.
    """
    stages: list[LoadStage] = []
    for i, part in enumerate(p for p in text.replace(" ", "").split(",") if p):
        try:
            rate_s, dur_s = part.split(":")
            stage = LoadStage(float(rate_s), float(dur_s))
        except ValueError:
            raise ConfigError(f"expected rate:duration, got {part!r}", f"stages[{i}]") from None
        if not (stage.rate > 0 and stage.duration > 0):
            raise ConfigError("rate and duration must be > 0", f"stages[{i}]")
        stages.append(stage)
    if not stages:
        raise ConfigError("no stages given", "stages")
    return stages


def stage_windows(stages: Sequence[LoadStage], warmup_first: bool) -> list[StageWindow]:
    """Place `stages` back to back from t=0; the first is a warm-up if `warmup_first`."""
    out: list[StageWindow] = []
    t = 0.0
    for i, s in enumerate(stages):
        warm = warmup_first and i == 0 and len(stages) > 1
        name = "warmup" if warm else f"qps={s.rate:g}"
        out.append(StageWindow(i, name, s.rate, t, t + s.duration, warm))
        t += s.duration
    return out


def arrival_times(
    stages: Sequence[LoadStage], process: str, rng: np.random.Generator
) -> Iterator[tuple[float, int]]:
    """Arrival times and stage index for stages back to back from t=0.

    Args:
        stages: The load stages.
        process: ``poisson`` (exponential gaps at the stage rate) or ``constant`` (even gaps).
        rng: Random source (Poisson only).

    Raises:
        ConfigError: Unknown process.
    """
    if process not in ("poisson", "constant"):
        raise ConfigError(f"unknown arrival process {process!r}; valid: poisson, constant")
    start = 0.0
    for idx, s in enumerate(stages):
        end = start + s.duration
        if process == "constant":
            n = math.floor(s.rate * s.duration + 1e-9)
            for k in range(n):
                yield start + k / s.rate, idx
        else:
            t = start + float(rng.exponential(1.0 / s.rate))
            while t < end:
                yield t, idx
                t += float(rng.exponential(1.0 / s.rate))
        start = end


class Workload(Protocol):
    """A source of requests for the fleet."""

    name: str

    def stages(self) -> list[StageWindow]:
        """The load stages, placed on the timeline."""
        ...

    def requests(self) -> Iterator[SimRequest]:
        """The requests known up front, in arrival order."""
        ...

    def on_complete(self, request: SimRequest, now: float) -> list[SimRequest]:
        """Follow-up requests caused by `request` completing at `now` (arrivals >= now)."""
        ...

    def expected_requests(self) -> int | None:
        """Total requests the run will see, when known (progress bars)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Knobs, for reports."""
        ...


def _random_tokens(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    return rng.integers(0, vocab, size=n, dtype=np.int32)


@dataclass
class SharedPrefixWorkload:
    """inference-perf's ``shared_prefix`` workload (the upstream llm-d benchmark's data).

    Attributes:
        num_groups: Distinct system prompts.
        num_prompts_per_group: Questions (users) per system prompt.
        system_prompt_len: System prompt tokens.
        question_len: Question tokens.
        output_len: Generated tokens per request.
        load: Load stages (the first is a warm-up when ``warmup_first``).
        arrival: ``poisson`` or ``constant``.
        vocab_size: Token ids are drawn from ``[0, vocab_size)``.
        seed: Random seed (prompts, order, arrivals, outputs).
        warmup_first: Treat the first stage as a cache-seating warm-up.
    """

    num_groups: int = 150
    num_prompts_per_group: int = 5
    system_prompt_len: int = 6000
    question_len: int = 1200
    output_len: int = 1000
    load: Sequence[LoadStage] = UPSTREAM_LADDER
    arrival: str = "poisson"
    vocab_size: int = 151936
    seed: int = 0
    warmup_first: bool = True
    name: str = "shared-prefix"
    _prompts: list[tuple[np.ndarray, int]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if min(self.num_groups, self.num_prompts_per_group, self.output_len) < 1:
            raise ConfigError("groups, prompts per group and output length must be >= 1")
        if self.system_prompt_len < 0 or self.question_len < 0:
            raise ConfigError("prompt lengths must be >= 0")
        if self.system_prompt_len + self.question_len < 1:
            raise ConfigError("prompts must have at least one token")

    def _build(self) -> list[tuple[np.ndarray, int]]:
        if not self._prompts:
            rng = np.random.default_rng([self.seed, 1])
            prompts: list[tuple[np.ndarray, int]] = []
            for g in range(self.num_groups):
                system = _random_tokens(rng, self.system_prompt_len, self.vocab_size)
                for _ in range(self.num_prompts_per_group):
                    question = _random_tokens(rng, self.question_len, self.vocab_size)
                    prompts.append((np.concatenate((system, question)), g))
            order = rng.permutation(len(prompts))
            self._prompts = [prompts[i] for i in order]
        return self._prompts

    def stages(self) -> list[StageWindow]:
        return stage_windows(self.load, self.warmup_first)

    def requests(self) -> Iterator[SimRequest]:
        prompts = self._build()
        n = len(prompts)
        arrivals = arrival_times(self.load, self.arrival, np.random.default_rng([self.seed, 2]))
        out_rng = np.random.default_rng([self.seed, 3])
        for i, (t, stage) in enumerate(arrivals):
            k = i % n
            prompt, group = prompts[k]
            yield SimRequest(
                request_id=f"sp-{i}",
                arrival_time=t,
                prompt=prompt,
                output_tokens=_random_tokens(out_rng, self.output_len, self.vocab_size),
                prompt_key=("sp", k),
                stage=stage,
                session=f"g{group}",
            )

    def on_complete(self, request: SimRequest, now: float) -> list[SimRequest]:
        return []

    def expected_requests(self) -> int | None:
        # Re-draw the same seeded arrivals: cheap, and exact for Poisson too.
        rng = np.random.default_rng([self.seed, 2])
        return sum(1 for _ in arrival_times(self.load, self.arrival, rng))

    def describe(self) -> dict[str, Any]:
        return {
            "workload": self.name,
            "num_groups": self.num_groups,
            "num_prompts_per_group": self.num_prompts_per_group,
            "system_prompt_len": self.system_prompt_len,
            "question_len": self.question_len,
            "output_len": self.output_len,
            "arrival": self.arrival,
            "stages": [[s.rate, s.duration] for s in self.load],
            "seed": self.seed,
        }


@dataclass
class MultiTurnWorkload:
    """Multi-turn chat sessions; each turn's prompt extends the previous prompt and answer.

    Attributes:
        load: Stages of session start rates (sessions per second).
        num_system_prompts: Distinct system prompts shared by the sessions.
        system_prompt_len: System prompt tokens.
        turns: Turns per session.
        user_message_len: Tokens of each new user message.
        answer_len: Generated tokens per turn.
        think_time_s: Mean think time between an answer and the next message (exponential).
        arrival: ``poisson`` or ``constant`` session starts.
        vocab_size: Token ids are drawn from ``[0, vocab_size)``.
        seed: Random seed.
    """

    load: Sequence[LoadStage] = (
        LoadStage(2, 60),
        LoadStage(4, 60),
        LoadStage(6, 60),
        LoadStage(8, 60),
    )
    num_system_prompts: int = 10
    system_prompt_len: int = 2000
    turns: int = 8
    user_message_len: int = 400
    answer_len: int = 400
    think_time_s: float = 5.0
    arrival: str = "poisson"
    vocab_size: int = 151936
    seed: int = 0
    name: str = "multi-turn"
    _systems: list[np.ndarray] = field(default_factory=list, init=False, repr=False)
    _windows: list[StageWindow] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if min(self.num_system_prompts, self.turns, self.answer_len, self.user_message_len) < 1:
            raise ConfigError("system prompts, turns, message and answer lengths must be >= 1")
        if self.think_time_s < 0:
            raise ConfigError("think time must be >= 0")

    def stages(self) -> list[StageWindow]:
        if not self._windows:
            self._windows = stage_windows(self.load, warmup_first=False)
        return self._windows

    def _stage_at(self, t: float) -> int:
        windows = self.stages()
        for w in windows:
            if t < w.end:
                return w.index
        return windows[-1].index

    def _turn_rng(self, session: int, turn: int) -> np.random.Generator:
        # NOTE: one stream per (session, turn), not one shared stream: turns complete in an
        # order that depends on the router, and every router must be offered the same talk.
        return np.random.default_rng([self.seed, 12, session, turn])

    def requests(self) -> Iterator[SimRequest]:
        rng = np.random.default_rng([self.seed, 11])
        self._systems = [
            _random_tokens(rng, self.system_prompt_len, self.vocab_size)
            for _ in range(self.num_system_prompts)
        ]
        arrivals = arrival_times(self.load, self.arrival, np.random.default_rng([self.seed, 13]))
        for s, (t, stage) in enumerate(arrivals):
            system = self._systems[s % self.num_system_prompts]
            turn_rng = self._turn_rng(s, 0)
            message = _random_tokens(turn_rng, self.user_message_len, self.vocab_size)
            yield SimRequest(
                request_id=f"s{s}-t0",
                arrival_time=t,
                prompt=np.concatenate((system, message)),
                output_tokens=_random_tokens(turn_rng, self.answer_len, self.vocab_size),
                stage=stage,
                session=f"s{s}",
                turn=0,
                extra={"session_index": s},
            )

    def on_complete(self, request: SimRequest, now: float) -> list[SimRequest]:
        s = request.extra.get("session_index")
        if request.turn + 1 >= self.turns or s is None:
            return []
        turn = request.turn + 1
        rng = self._turn_rng(s, turn)
        think = float(rng.exponential(self.think_time_s)) if self.think_time_s > 0 else 0.0
        message = _random_tokens(rng, self.user_message_len, self.vocab_size)
        t = now + think
        return [
            SimRequest(
                request_id=f"{request.session}-t{turn}",
                arrival_time=t,
                prompt=np.concatenate((request.prompt, request.output_tokens, message)),
                output_tokens=_random_tokens(rng, self.answer_len, self.vocab_size),
                stage=self._stage_at(t),
                session=request.session,
                turn=turn,
                extra={"session_index": s},
            )
        ]

    def expected_requests(self) -> int | None:
        rng = np.random.default_rng([self.seed, 13])
        return sum(1 for _ in arrival_times(self.load, self.arrival, rng)) * self.turns

    def describe(self) -> dict[str, Any]:
        return {
            "workload": self.name,
            "num_system_prompts": self.num_system_prompts,
            "system_prompt_len": self.system_prompt_len,
            "turns": self.turns,
            "user_message_len": self.user_message_len,
            "answer_len": self.answer_len,
            "think_time_s": self.think_time_s,
            "arrival": self.arrival,
            "stages": [[s.rate, s.duration] for s in self.load],
            "seed": self.seed,
        }


@dataclass(frozen=True, slots=True)
class MooncakeRow:
    """One row of a Mooncake trace (timestamps in milliseconds)."""

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def load_mooncake(path: str | Path, block_tokens: int = 512) -> list[MooncakeRow]:
    """Read a Mooncake-format JSONL trace, sorted by timestamp.

    Args:
        path: The file.
        block_tokens: Tokens per hash_id block (512 in Mooncake's traces).

    Raises:
        ConfigError: The file cannot be read, or a row is malformed (the message names the line).
    """
    p = Path(path)
    try:
        # utf-8-sig: files written on Windows often start with a byte-order mark.
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read trace: {exc}", str(p)) from None
    rows: list[MooncakeRow] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p.name}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not JSON: {exc.msg}", where) from None
        if not isinstance(obj, dict):
            raise ConfigError("a row must be a JSON object", where)
        try:
            ts = obj["timestamp"]
            n_in = obj["input_length"]
            n_out = obj["output_length"]
            ids = obj["hash_ids"]
        except KeyError as exc:
            raise ConfigError(f"missing field {exc.args[0]!r}", where) from None
        if isinstance(ts, bool) or not isinstance(ts, int | float) or ts < 0:
            raise ConfigError("timestamp must be a number >= 0 (milliseconds)", where)
        for fname, v in (("input_length", n_in), ("output_length", n_out)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{fname} must be an integer >= 0", where)
        if n_in < 1:
            raise ConfigError("input_length must be >= 1", where)
        if not isinstance(ids, list) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in ids
        ):
            raise ConfigError("hash_ids must be a list of integers >= 0", where)
        needed = -(-n_in // block_tokens)
        if len(ids) < needed:
            raise ConfigError(
                f"{len(ids)} hash_ids cover at most {len(ids) * block_tokens} tokens, "
                f"input_length is {n_in}",
                where,
            )
        rows.append(MooncakeRow(float(ts), n_in, n_out, tuple(ids[:needed])))
    if not rows:
        raise ConfigError("the trace has no rows", str(p))
    rows.sort(key=lambda r: r.timestamp_ms)
    return rows


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def block_tokens_for(hash_id: int, n: int, vocab: int, seed: int) -> np.ndarray:
    """The `n` tokens of trace block `hash_id`: a fixed function of (seed, hash_id, position)."""
    x = (np.arange(n, dtype=np.uint64) + np.uint64((hash_id * n) & 0xFFFFFFFFFFFF)) * _GOLDEN
    x ^= np.uint64((seed * 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF)
    # splitmix64 finalizer: well-mixed, deterministic, vectorized.
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x % np.uint64(vocab)).astype(np.int32)


@dataclass
class TraceWorkload:
    """Replay of a Mooncake-format trace.

    Attributes:
        path: The JSONL file.
        block_tokens: Tokens per hash_id block.
        time_scale: Multiply inter-arrival times by this (0.5 = twice the load).
        max_requests: Replay only the first rows.
        window_s: Report window length (the trace's "stages").
        vocab_size: Token ids are drawn from ``[0, vocab_size)``.
        seed: Random seed (block contents, outputs).
    """

    path: str | Path
    block_tokens: int = 512
    time_scale: float = 1.0
    max_requests: int | None = None
    window_s: float = 120.0
    vocab_size: int = 151936
    seed: int = 0
    name: str = "trace"
    _rows: list[MooncakeRow] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.time_scale <= 0 or self.window_s <= 0:
            raise ConfigError("time scale and window must be > 0")

    def rows(self) -> list[MooncakeRow]:
        """The rows replayed (loaded on first use)."""
        if not self._rows:
            rows = load_mooncake(self.path, self.block_tokens)
            if self.max_requests is not None:
                rows = rows[: self.max_requests]
            self._rows = rows
        return self._rows

    def _t(self, row: MooncakeRow) -> float:
        return (row.timestamp_ms - self.rows()[0].timestamp_ms) / 1000.0 * self.time_scale

    def stages(self) -> list[StageWindow]:
        rows = self.rows()
        end = self._t(rows[-1]) + 1e-9
        n = max(1, math.ceil(end / self.window_s))
        counts = [0] * n
        for r in rows:
            counts[min(n - 1, int(self._t(r) // self.window_s))] += 1
        out = []
        for i in range(n):
            start = i * self.window_s
            stop = min(end, (i + 1) * self.window_s) if i == n - 1 else (i + 1) * self.window_s
            dur = max(stop - start, 1e-9)
            out.append(StageWindow(i, f"t={start:g}s", counts[i] / dur, start, stop))
        return out

    def prompt_tokens(self, row: MooncakeRow) -> np.ndarray:
        """The prompt of `row`: its blocks' tokens, the last block cut to ``input_length``."""
        bt = self.block_tokens
        parts = [block_tokens_for(h, bt, self.vocab_size, self.seed) for h in row.hash_ids]
        return np.concatenate(parts)[: row.input_length]

    def requests(self) -> Iterator[SimRequest]:
        rows = self.rows()
        out_rng = np.random.default_rng([self.seed, 21])
        n_windows = len(self.stages())
        for i, row in enumerate(rows):
            t = self._t(row)
            yield SimRequest(
                request_id=f"tr-{i}",
                arrival_time=t,
                prompt=self.prompt_tokens(row),
                output_tokens=_random_tokens(out_rng, max(1, row.output_length), self.vocab_size),
                stage=min(n_windows - 1, int(t // self.window_s)),
            )

    def on_complete(self, request: SimRequest, now: float) -> list[SimRequest]:
        return []

    def expected_requests(self) -> int | None:
        return len(self.rows())

    def describe(self) -> dict[str, Any]:
        return {
            "workload": self.name,
            "path": Path(self.path).name,
            "rows": len(self.rows()),
            "block_tokens": self.block_tokens,
            "time_scale": self.time_scale,
            "window_s": self.window_s,
            "seed": self.seed,
        }
