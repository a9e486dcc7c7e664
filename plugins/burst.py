"""``burst-prefix-cache-producer``: co-locates bursts of prompt-sharing requests (upstream llm-d's
burst prefix producer).

Requests scheduled within ``windowDurationMs`` of the first one form a batch. When the window
closes the batch is assigned jointly: requests with an identical prompt prefix form a group that
goes to one replica (``maxPerReplica`` > 0 splits it into chunks of that size), groups with the
longest prefixes first, each onto the least-loaded replica of the batch (load in requests, or in
prefix blocks with ``balanceBy: tokens``); with ``minColocateBlocks`` > 0 a request sharing that
many leading blocks with another joins the replica holding it while that replica is under its
fair share. The producer's match info then says *full match* on the assigned replica and
nothing elsewhere, for ``prefix-cache-scorer`` to score. A request alone in its window, or
without a full block, gets no affinity.

NOTE: a window makes every request wait up to ``windowDurationMs``; requests wait in the
scheduler's worker threads (the plugin asks for up to ``maxWorkers`` of them: ``blocking_io``),
so a window batches at most that many concurrent requests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, model_validator

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.keys import DerivedKeyer
from kvaware_scorer.scheduler import (
    Endpoint,
    PluginContext,
    PluginRegistry,
    SchedulingContext,
    SchedulingRequest,
    per_call,
)
from kvaware_scorer.scheduler.matchinfo import MatchInfo

__all__ = ["BurstParams", "BurstPrefixProducer", "assign", "register"]


class BurstParams(ConfigModel):
    """Parameters of ``burst-prefix-cache-producer`` (upstream's).

    Attributes:
        window_duration_ms: The batch window (1..10000 ms).
        max_per_replica: Requests of one group per replica; -1 = the whole group on one.
        block_size_tokens: Tokens per prefix block.
        max_prefix_tokens_to_match: Prefix tokens considered (0 = the whole prompt).
        min_colocate_blocks: Leading blocks two distinct prompts must share to be co-located
            (0: only identical prompts are).
        max_batch_size: Requests one window holds (-1 = no limit); later ones get no affinity.
        balance_by: ``requests`` or ``tokens`` (prefix blocks) balanced across replicas.
        max_workers: Scheduler worker threads requested (requests that can wait at once).
    """

    window_duration_ms: int = Field(100, ge=1, le=10_000)
    max_per_replica: int = -1
    block_size_tokens: int = Field(64, ge=1)
    max_prefix_tokens_to_match: int = Field(0, ge=0)
    min_colocate_blocks: int = Field(0, ge=0)
    max_batch_size: int = 1000
    balance_by: Literal["requests", "tokens"] = "requests"
    max_workers: int = Field(64, ge=1, le=1024)

    @model_validator(mode="after")
    def _limits(self) -> BurstParams:
        if self.max_per_replica == 0 or self.max_per_replica < -1:
            raise ValueError("maxPerReplica must be -1 or > 0")
        if self.max_batch_size == 0 or self.max_batch_size < -1:
            raise ValueError("maxBatchSize must be -1 or > 0")
        mt = self.max_prefix_tokens_to_match
        if 0 < mt < self.block_size_tokens:
            raise ValueError("maxPrefixTokensToMatch must be 0 or >= blockSizeTokens")
        return self


@dataclass(eq=False)
class _Entry:
    keys: tuple[int, ...]
    pods: list[str]
    assigned: str | None = None


@dataclass
class _Batch:
    deadline: float
    entries: list[_Entry] = field(default_factory=list)
    done: bool = False


def assign(entries: Sequence[_Entry], per_replica: int, min_colocate: int, by_tokens: bool) -> None:
    """Assign the batch's entries to replicas (sets `_Entry.assigned`; see the module doc)."""
    groups: dict[tuple[int, ...], list[_Entry]] = {}
    for e in entries:
        if e.keys:
            groups.setdefault(e.keys, []).append(e)
    replicas = next((e.pods for e in entries if e.pods), [])
    if not replicas or not groups:
        return
    sig_count: dict[tuple[int, ...], int] = {}
    if min_colocate > 0:
        for key, members in groups.items():
            if len(key) >= min_colocate:
                sig = key[:min_colocate]
                sig_count[sig] = sig_count.get(sig, 0) + len(members)
    units = [k for k, m in groups.items() if len(m) >= 2]
    singles = [
        k
        for k, m in groups.items()
        if len(m) == 1 and min_colocate > 0 and sig_count.get(k[:min_colocate], 0) >= 2
    ]
    # NOTE: longer prefixes first, so shorter units match against the richest placements.
    units.sort(key=len, reverse=True)
    singles.sort(key=len, reverse=True)
    load = dict.fromkeys(replicas, 0)
    placed: dict[str, list[tuple[int, ...]]] = {r: [] for r in replicas}

    def weight(key: tuple[int, ...], n: int) -> int:
        return len(key) if by_tokens else n

    total = sum(weight(k, len(groups[k])) for k in units + singles)
    fair = -(-total // len(replicas))  # a replica's fair share of the batch (ceil)

    def place(key: tuple[int, ...], members: list[_Entry]) -> None:
        target = None
        if min_colocate > 0:
            sharing = [
                r
                for r in replicas
                if load[r] < fair and any(p[:min_colocate] == key[:min_colocate] for p in placed[r])
            ]
            if sharing:
                target = min(sharing, key=lambda r: load[r])
        if target is None:
            target = min(replicas, key=lambda r: load[r])
        for m in members:
            m.assigned = target
        if not by_tokens:
            load[target] += len(members)
        elif key not in placed[target]:
            load[target] += len(key)  # a prefix is charged once per replica
        placed[target].append(key)

    for key in units:
        members = groups[key]
        step = per_replica if per_replica > 0 else len(members)
        for i in range(0, len(members), step):
            place(key, members[i : i + step])
    for key in singles:
        place(key, groups[key])


class BurstPrefixProducer:
    """``burst-prefix-cache-producer`` (see the module docstring)."""

    def __init__(self, params: BurstParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.params = params
        self.keyer = DerivedKeyer(params.block_size_tokens, "")
        self.window = params.window_duration_ms / 1000.0
        self.min_workers = params.max_workers
        self._cond = threading.Condition()
        self._batch: _Batch | None = None

    #: Waits for its window while scheduling: `aschedule` runs the pipeline in worker threads.
    blocking_io = True

    def _keys(self, request: SchedulingRequest) -> tuple[int, ...]:
        if request.has_tokens:
            toks = request.tokens(list)
        else:
            # NOTE: no tokenizer here: UTF-8 bytes packed 4 per pseudo-token, as the
            # approximate prefix plugin estimates (identical prompts still group exactly).
            text = request.prompt or "".join(
                f"{m.get('role', '')}:{m.get('content', '')}\n" for m in request.messages or ()
            )
            data = text.encode("utf-8")
            toks = [int.from_bytes(data[i : i + 4], "little") for i in range(0, len(data), 4)]
        limit = self.params.max_prefix_tokens_to_match
        if limit:
            toks = toks[:limit]
        return tuple(
            self.keyer.block_keys(toks, request.model, request.lora_name, request.cache_salt)
        )

    def _join(self, entry: _Entry) -> None:
        with self._cond:
            now = time.monotonic()
            batch = self._batch
            if batch is None or batch.done or now >= batch.deadline:
                batch = self._batch = _Batch(now + self.window)
            cap = self.params.max_batch_size
            if cap > 0 and len(batch.entries) >= cap:
                return  # the window is full: no affinity for this one
            batch.entries.append(entry)
            while not batch.done:
                left = batch.deadline - time.monotonic()
                if left <= 0:
                    p = self.params
                    assign(
                        batch.entries,
                        p.max_per_replica,
                        p.min_colocate_blocks,
                        p.balance_by == "tokens",
                    )
                    batch.done = True
                    self._cond.notify_all()
                    break
                self._cond.wait(left)

    def match_info(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> MatchInfo:
        """Full match on the replica the window assigned the request to (computed once per
        scheduling call)."""

        def compute() -> MatchInfo:
            keys = self._keys(request)
            if not keys:
                return {}, 0, self.params.block_size_tokens
            entry = _Entry(keys, [e.id for e in endpoints])
            self._join(entry)
            matched = {entry.assigned: float(len(keys))} if entry.assigned else {}
            return matched, len(keys), self.params.block_size_tokens

        return per_call(request, self.name + ":burst", ctx, endpoints, compute)

    def pre_request(
        self, ctx: SchedulingContext, request: SchedulingRequest, result: object
    ) -> None:
        """Nothing to record: the window's assignment is all this producer knows."""


def register(registry: PluginRegistry) -> None:
    """Register ``burst-prefix-cache-producer``."""
    registry.register(
        "burst-prefix-cache-producer",
        BurstPrefixProducer,
        params=BurstParams,
        kinds=("pre-request",),
        description="co-locates bursts of prompt-sharing requests within a batch window",
    )
