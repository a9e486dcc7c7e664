"""``program-aware-fairness``: upstream llm-d's flow-control fairness policy that serves the
program (flow) with the least attained service.

A program is a flow of flow control (the fairness id: the ``x-llm-d-inference-fairness-id``
header, else the ``agent-identity`` attribute, else ``default-flow``). The policy keeps per
program what it dispatched, what is in flight, its mean queue wait and its attained service:
``prompt tokens + 2 x completion tokens`` of every completed request, halved every
``lasHalfLifeSeconds``. Among the non-empty flows of a band it serves the one with the best
``lasWeightService x (1 - service normalized) + lasWeightHeadWait x head wait normalized``
(both normalized min-max over the candidates). Idle programs are forgotten after
``evictionTtlSeconds``; `MAX_PROGRAMS` bounds the table whatever the clients send.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator, model_validator

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.scheduler import (
    PluginContext,
    PluginRegistry,
    ResponseInfo,
    SchedulingContext,
    SchedulingRequest,
    SchedulingResult,
)
from kvaware_scorer.scheduler.flowcontrol import DEFAULT_FLOW, FAIRNESS_HEADERS, QueuedRequest

__all__ = [
    "MAX_PROGRAMS",
    "ProgramAwareFairness",
    "ProgramAwareParams",
    "register",
]

#: Programs tracked at most: beyond it the least recently seen one is forgotten (an idle one
#: first), so a client inventing a fairness id per request cannot grow the table without limit.
MAX_PROGRAMS = 10_000
#: Scoring strategies upstream implements.
STRATEGIES = ("las",)
#: Cost of a prompt token and of a completion token in attained service (upstream's weights).
PROMPT_TOKEN_COST = 1.0
COMPLETION_TOKEN_COST = 2.0
#: The agent identity attribute flow control falls back to (set by ``agent-identity``).
_IDENTITY_ATTRIBUTE = "attribute:agent-identity"


class ProgramAwareParams(ConfigModel):
    """Parameters of ``program-aware-fairness`` (upstream's names, defaults and checks)."""

    strategy: str = "las"
    las_weight_service: float = Field(0.8, allow_inf_nan=False)
    las_weight_head_wait: float = Field(0.2, allow_inf_nan=False)
    las_half_life_seconds: float = Field(60.0, allow_inf_nan=False)
    eviction_ttl_seconds: float = Field(3600.0, allow_inf_nan=False)
    eviction_sweep_seconds: float = Field(300.0, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_keeps_default(cls, data: Any) -> Any:
        # NOTE: upstream decodes JSON onto its defaults, where a null leaves the default.
        if isinstance(data, Mapping):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        if value == "":
            return "las"
        if value not in STRATEGIES:
            raise ValueError(f'unknown scoring strategy "{value}": only "las" is supported')
        return value

    @field_validator(
        "las_weight_service",
        "las_weight_head_wait",
        "las_half_life_seconds",
        "eviction_ttl_seconds",
    )
    @classmethod
    def _not_negative(cls, value: float) -> float:
        if value < 0:
            raise ValueError(f"must be >= 0, got {value:g}")
        return value

    @field_validator("eviction_sweep_seconds")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"must be > 0, got {value:g}")
        return value


@dataclass
class _Program:
    """What the policy knows of one program (times on the plugin's clock)."""

    last_completion: float  # seeded with the creation time: a silent program still expires
    decay_anchor: float  # the instant up to which decay is folded into `service`
    service: float = 0.0
    dispatched: int = 0
    in_flight: int = 0
    wait_count: int = 0
    wait_mean: float = 0.0  # seconds

    def decayed(self, now: float, half_life: float) -> float:
        """The attained service at `now`, the decay since the anchor folded in."""
        elapsed = now - self.decay_anchor
        if elapsed > 0:
            if half_life > 0:
                self.service *= math.exp2(-elapsed / half_life)
            self.decay_anchor = now
        return self.service


def _normalize(value: float, low: float, high: float) -> float:
    """`value` scaled to [0, 1] over [low, high]; 0.5 when the range is empty."""
    return 0.5 if high == low else (value - low) / (high - low)


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index of `values`: 1.0 when they are equal, or fewer than two."""
    total_sq = sum(v * v for v in values)
    if len(values) <= 1 or total_sq == 0:
        return 1.0
    return sum(values) ** 2 / (len(values) * total_sq)


class ProgramAwareFairness:
    """``program-aware-fairness``: least attained service between programs (see the module).

    As a fairness policy it picks the flow; as a pre-request hook it counts a dispatch and the
    request's queue wait; as a post-response hook it adds the request's token cost to the
    program's service and stamps its completion. The dispatcher (event loop), the pre-request
    hooks (possibly a worker thread) and the post-response hooks (the front door) share the
    table under one lock.
    """

    def __init__(self, params: ProgramAwareParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.strategy = params.strategy
        self.weight_service = params.las_weight_service
        self.weight_head_wait = params.las_weight_head_wait
        self.half_life = params.las_half_life_seconds
        self.ttl = params.eviction_ttl_seconds
        self.sweep_interval = params.eviction_sweep_seconds
        self.max_programs = MAX_PROGRAMS
        self._clock = ctx.clock
        self._lock = threading.Lock()
        # NOTE: bounded: idle programs expire after `ttl` (checked every `sweep_interval`, on
        # the next call after it elapsed: no background thread) and the table never holds more
        # than `max_programs` (least recently seen first out). Most recently seen last.
        self._programs: OrderedDict[str, _Program] = OrderedDict()
        self._last_sweep = self._clock()
        self._flow_key = f"{ctx.name}:program"
        self._counted_key = f"{ctx.name}:counted"
        self._enqueued_key = f"{ctx.name}:enqueued"

    # -- the table ---------------------------------------------------------------------------------

    def _program(self, program: str, now: float) -> _Program:
        """`program`'s entry, made (and the table bounded) if needed; marks it recently seen.
        The caller holds the lock."""
        entry = self._programs.get(program)
        if entry is not None:
            self._programs.move_to_end(program)
            return entry
        if len(self._programs) >= self.max_programs:
            self._sweep(now)
        while len(self._programs) >= self.max_programs:
            idle = next((k for k, p in self._programs.items() if p.in_flight == 0), None)
            del self._programs[idle if idle is not None else next(iter(self._programs))]
        entry = self._programs[program] = _Program(last_completion=now, decay_anchor=now)
        return entry

    def _maybe_sweep(self, now: float) -> None:
        if now - self._last_sweep >= self.sweep_interval:
            self._last_sweep = now
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Forget programs with nothing in flight and no completion for longer than the TTL
        (a TTL of 0 keeps them; the cap still bounds the table). The caller holds the lock."""
        if self.ttl <= 0:
            return
        for key in [
            k
            for k, p in self._programs.items()
            if p.in_flight == 0 and now - p.last_completion > self.ttl
        ]:
            del self._programs[key]

    def programs(self) -> list[str]:
        """The programs tracked, least recently seen first."""
        with self._lock:
            return list(self._programs)

    def service(self, program: str) -> float:
        """`program`'s attained service now (0 when untracked), in weighted tokens."""
        with self._lock:
            entry = self._programs.get(program)
            return entry.decayed(self._clock(), self.half_life) if entry is not None else 0.0

    def fairness_index(self) -> float:
        """Jain's fairness index over the mean queue wait of the programs that waited."""
        with self._lock:
            return jain_index([p.wait_mean for p in self._programs.values() if p.wait_count])

    def snapshot(self) -> dict[str, Any]:
        """Aggregates only (program ids come from clients): programs, in flight, fairness."""
        with self._lock:
            programs = len(self._programs)
            in_flight = sum(p.in_flight for p in self._programs.values())
        return {
            "totalPrograms": programs,
            "totalInFlight": in_flight,
            "fairnessIndex": self.fairness_index(),
        }

    # -- fairness policy ---------------------------------------------------------------------------

    def pick_flow(self, flows: Mapping[str, Sequence[QueuedRequest]], ordering: Any) -> str:
        """The non-empty flow with the best least-attained-service score; equal scores go to
        the flow whose first request comes first by `ordering`."""
        now = self._clock()
        candidates: list[tuple[str, float, float]] = []  # (flow, service, head wait)
        with self._lock:
            self._maybe_sweep(now)
            for flow, queue in flows.items():
                if not queue:
                    continue
                service = self._program(flow, now).decayed(now, self.half_life)
                # NOTE: the head's arrival is on flow control's clock, maybe not this one; the
                # waits are only compared after min-max normalization, which an offset does not
                # change.
                candidates.append((flow, service, now - queue[0].arrived))
        if not candidates:
            raise ValueError("pick_flow needs a non-empty flow")
        low_s = min(c[1] for c in candidates)
        high_s = max(c[1] for c in candidates)
        low_w = min(c[2] for c in candidates)
        high_w = max(c[2] for c in candidates)

        def rank(c: tuple[str, float, float]) -> tuple[float, Any]:
            score = self.weight_service * (
                1 - _normalize(c[1], low_s, high_s)
            ) + self.weight_head_wait * _normalize(c[2], low_w, high_w)
            return (-score, ordering.order_key(flows[c[0]][0]))

        best = min(candidates, key=rank)[0]
        head = flows[best][0]
        head.request.state[self._flow_key] = best
        head.request.state[self._enqueued_key] = head.arrived
        return best

    # -- request hooks -----------------------------------------------------------------------------

    def _program_of(self, request: SchedulingRequest) -> str:
        """The request's program: the flow it was picked from, else flow control's fairness id
        (fairness header, agent identity, ``default-flow``)."""
        picked = request.state.get(self._flow_key)
        if isinstance(picked, str) and picked:
            return picked
        for name in FAIRNESS_HEADERS:
            value = request.headers.get(name, "").strip()
            if value:
                return value
        ident = request.state.get(_IDENTITY_ATTRIBUTE)
        return ident if isinstance(ident, str) and ident else DEFAULT_FLOW

    def pre_request(
        self, ctx: SchedulingContext, request: SchedulingRequest, result: SchedulingResult
    ) -> None:
        """Count the dispatch, and the queue wait of a request flow control held."""
        now = self._clock()
        if request.state.get(self._counted_key):
            return  # a retry rescheduling the same request: counted at its first pick
        request.state[self._counted_key] = True
        program = self._program_of(request)
        request.state[self._flow_key] = program
        enqueued = request.state.get(self._enqueued_key)
        with self._lock:
            self._maybe_sweep(now)
            entry = self._program(program, now)
            entry.dispatched += 1
            entry.in_flight += 1
            if isinstance(enqueued, float | int):
                entry.wait_count += 1
                entry.wait_mean += (max(0.0, now - enqueued) - entry.wait_mean) / entry.wait_count

    def post_response(
        self, request: SchedulingRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        """Add the request's token cost to its program's service; stamp the completion."""
        now = self._clock()
        program = self._program_of(request)
        cost = PROMPT_TOKEN_COST * max(0, response.prompt_tokens) + COMPLETION_TOKEN_COST * max(
            0, response.completion_tokens
        )
        with self._lock:
            self._maybe_sweep(now)
            entry = self._program(program, now)
            entry.decayed(now, self.half_life)
            entry.service += cost
            entry.in_flight = max(0, entry.in_flight - 1)
            entry.last_completion = now


def register(registry: PluginRegistry) -> None:
    """Register ``program-aware-fairness``."""
    registry.register(
        "program-aware-fairness",
        ProgramAwareFairness,
        params=ProgramAwareParams,
        kinds=("fairness-policy", "pre-request", "post-response"),
        description="serves the program (fairness id) with the least attained token service",
    )
