"""One emulated vLLM pod: vLLM v1's scheduler and KV-cache manager over a `BlockPool`.

The engine is driven step by step by whoever owns the clock (the discrete-event simulator, or a
real-time driver): `begin_step(now)` schedules a batch exactly as vLLM v1's ``Scheduler.schedule``
does and returns how long the step takes; `finish_step(now)` applies the step's outputs like
``update_from_output`` and returns the tokens sampled, the finished requests and the step's KV
events. What follows vLLM (``vllm/v1/core/sched/scheduler.py``, ``kv_cache_manager.py``):

* Running requests are scheduled first, in order, each for ``num_tokens - num_computed_tokens``
  tokens (1 when decoding) capped by the remaining token budget (chunked prefill).
* When a running request needs blocks and none are free, the last running request (lowest
  priority under FCFS) is preempted by recompute: its blocks are freed tail first, its computed
  tokens reset, and it goes back to the head of the waiting queue. No waiting request is admitted
  in a step that preempted.
* Waiting requests are admitted FCFS while budget and ``max_num_seqs`` allow; each looks up its
  longest prefix-cache hit (full blocks only, capped at ``num_tokens - 1``), and the head of the
  queue blocks the others when its blocks do not fit.
* Blocks become cached (and announced) when they are full, at scheduling time: a long prompt is
  announced chunk by chunk, each chunk chained to the previous; a decode block when its last
  token is scheduled.
* A request finishes when it has generated its ``max_tokens``; its blocks are freed tail first.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from kvaware_scorer.sim.blocks import BlockPool
from kvaware_scorer.sim.hashing import BlockHasher
from kvaware_scorer.sim.profiles import EngineProfile, StepCost
from kvaware_scorer.sim.request import SimRequest
from kvaware_scorer.sim.wire import KVEvent

__all__ = ["Engine", "EngineRequest", "EngineStats", "RequestStatus", "StepOutput"]

logger = logging.getLogger(__name__)


class RequestStatus(Enum):
    """Lifecycle of a request inside one engine."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class EngineRequest:
    """A request's state inside one engine (vLLM's ``Request`` plus its block table)."""

    __slots__ = (
        "block_hashes",
        "blocks",
        "finish_time",
        "first_token_time",
        "hash_state",
        "max_tokens",
        "num_cached_blocks",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_output_tokens",
        "num_prompt_tokens",
        "num_tokens",
        "preemptions",
        "request_id",
        "sim",
        "status",
        "tokens",
    )

    def __init__(self, sim: SimRequest) -> None:
        self.sim = sim
        self.request_id = sim.request_id
        self.num_prompt_tokens = len(sim.prompt)
        self.max_tokens = len(sim.output_tokens)
        self.tokens: np.ndarray = np.concatenate((sim.prompt, sim.output_tokens)).astype(
            np.int32, copy=False
        )
        self.num_tokens = self.num_prompt_tokens
        self.num_computed_tokens = 0
        self.num_output_tokens = 0
        self.block_hashes: list[int] = list(sim.block_hashes or ())
        self.hash_state: object | None = sim.hash_state
        self.blocks: list[int] = []
        self.num_cached_blocks = 0
        self.num_cached_tokens = -1
        self.status = RequestStatus.WAITING
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.preemptions = 0

    def __repr__(self) -> str:
        return (
            f"EngineRequest({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, out={self.num_output_tokens}/{self.max_tokens})"
        )


@dataclass(slots=True)
class StepOutput:
    """What one finished step produced.

    Attributes:
        first_tokens: Requests whose first output token was sampled in this step.
        finished: Requests that completed in this step (blocks already freed).
        events: KV events of the step, in generation order.
        sampled: Tokens sampled in this step.
    """

    first_tokens: list[EngineRequest] = field(default_factory=list)
    finished: list[EngineRequest] = field(default_factory=list)
    events: list[KVEvent] = field(default_factory=list)
    sampled: int = 0


@dataclass(slots=True)
class EngineStats:
    """Counters of one engine, defined as vLLM defines its metrics.

    Attributes:
        steps: Engine steps run.
        busy_time: Virtual seconds spent in steps.
        prefix_queries: Prompt tokens looked up at first admissions
            (``vllm:prefix_cache_queries``; resumes after a preemption are not counted, vLLM
            keeps them apart as ``PrefixCacheStats.preempted_queries``).
        prefix_hits: Tokens hit at first admissions (``vllm:prefix_cache_hits``).
        preempted_prefix_queries: Tokens looked up when preempted requests resumed.
        preempted_prefix_hits: Tokens hit when preempted requests resumed.
        preemptions: ``vllm:num_preemptions``.
        prompt_tokens: Whole prompt lengths, counted at each request's first token
            (``vllm:prompt_tokens``; cached tokens included).
        prompt_tokens_cached: Their cached part (``vllm:prompt_tokens_cached``).
        generated_tokens: ``vllm:generation_tokens``.
    """

    steps: int = 0
    busy_time: float = 0.0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preempted_prefix_queries: int = 0
    preempted_prefix_hits: int = 0
    preemptions: int = 0
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0
    generated_tokens: int = 0


@dataclass(slots=True)
class _StepPlan:
    """The batch `Engine.begin_step` is building: what it scheduled and the step's cost terms.

    Attributes:
        budget: Tokens still schedulable in this step (``max_num_batched_tokens`` at first).
        scheduled: (request, tokens scheduled) in scheduling order.
        tokens: Tokens scheduled.
        attention_pairs: Query-key pairs of the scheduled tokens (causal attention).
        context_read_tokens: Already computed tokens the scheduled ones attend to.
        sampled: Requests whose next token is sampled at the end of the step.
    """

    budget: int
    scheduled: list[tuple[EngineRequest, int]] = field(default_factory=list)
    tokens: int = 0
    attention_pairs: float = 0.0
    context_read_tokens: int = 0
    sampled: int = 0

    def add(self, budget: int, tokens: int, pairs: float, ctx: int, sampled: int) -> None:
        """Record one scheduling phase: the budget it left and the terms it added."""
        self.budget = budget
        self.tokens += tokens
        self.attention_pairs += pairs
        self.context_read_tokens += ctx
        self.sampled += sampled

    def cost(self) -> StepCost:
        """The step's cost terms for the profile's step-time model."""
        cost = StepCost()
        cost.tokens = self.tokens
        cost.attention_pairs = self.attention_pairs
        cost.context_read_tokens = self.context_read_tokens
        cost.sampled = self.sampled
        cost.sequences = len(self.scheduled)
        return cost


class Engine:
    """One vLLM pod's scheduler, KV-cache manager and step-time model.

    Args:
        profile: The pod's profile (capacity, budget, step time).
        hasher: Block hasher (the same for every pod of a fleet, like vLLM pods sharing a
            hash algorithm and seed).
        num_gpu_blocks: Override the profile's pool size (small pools for tests).
        enable_events: Record KV events.
    """

    def __init__(
        self,
        profile: EngineProfile,
        hasher: BlockHasher,
        *,
        num_gpu_blocks: int | None = None,
        enable_events: bool = True,
    ) -> None:
        if hasher.block_size != profile.block_size:
            raise ValueError("hasher and profile disagree on the block size")
        self.profile = profile
        self.hasher = hasher
        self.block_size = profile.block_size
        self.max_num_batched_tokens = profile.max_num_batched_tokens
        self.max_num_seqs = profile.max_num_seqs
        blocks = num_gpu_blocks if num_gpu_blocks is not None else profile.num_gpu_blocks
        self.pool = BlockPool(blocks, profile.block_size, enable_events)
        self.max_model_len = min(
            profile.max_model_len or profile.model.max_model_len,
            (blocks - 1) * profile.block_size,
        )
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self.stats = EngineStats()
        self._scheduled: list[tuple[EngineRequest, int]] = []
        self._in_step = False

    # -- requests -------------------------------------------------------------------------------

    def validate(self, request: SimRequest) -> str | None:
        """Why vLLM would reject `request` up front (a 400), or None."""
        n = request.num_prompt_tokens
        if n == 0:
            return "empty prompt"
        if request.max_tokens < 1:
            return "max_tokens must be >= 1"
        if n + request.max_tokens > self.max_model_len:
            return (
                f"this model's maximum context length is {self.max_model_len} tokens; "
                f"the request asks for {n} prompt + {request.max_tokens} output tokens"
            )
        return None

    def add_request(self, request: SimRequest) -> EngineRequest:
        """Queue `request` (vLLM ``add_request``): it is scheduled from the next step on.

        Raises:
            ValueError: The request is invalid (see `validate`).
        """
        reason = self.validate(request)
        if reason is not None:
            raise ValueError(reason)
        er = EngineRequest(request)
        if len(er.block_hashes) < er.num_tokens // self.block_size:
            self._extend_hashes(er)
        self.waiting.append(er)
        return er

    def has_work(self) -> bool:
        """Whether a step would do anything."""
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        """``vllm:num_requests_waiting``."""
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        """``vllm:num_requests_running``."""
        return len(self.running)

    def kv_usage(self) -> float:
        """``vllm:kv_cache_usage_perc`` (fraction)."""
        return self.pool.usage()

    def reset_prefix_cache(self) -> bool:
        """vLLM's ``/reset_prefix_cache``: succeeds only when no block is in use."""
        return self.pool.reset_prefix_cache()

    def abort_request(self, request: EngineRequest) -> bool:
        """Abort `request` between steps (vLLM ``finish_requests(..., FINISHED_ABORTED)``).

        It leaves the waiting queue or the running batch and its blocks are freed tail first,
        exactly as at a normal finish: the blocks it cached stay cached (and evictable).

        Returns:
            False when it had already finished (nothing to do).

        Raises:
            RuntimeError: Called between `begin_step` and `finish_step` (vLLM applies aborts
                between engine steps too).
        """
        if self._in_step:
            raise RuntimeError("requests can only be aborted between steps")
        if request.status is RequestStatus.FINISHED:
            return False
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                return False
        self.pool.free_blocks(reversed(request.blocks))
        request.blocks = []
        request.status = RequestStatus.FINISHED
        return True

    # -- hashing --------------------------------------------------------------------------------

    def _extend_hashes(self, r: EngineRequest) -> None:
        bs = self.block_size
        have = len(r.block_hashes)
        full = r.num_tokens // bs
        if full <= have:
            return
        chunk = r.tokens[have * bs : full * bs]
        values, state = self.hasher.chain(
            chunk, have, r.hash_state, r.sim.lora_name, r.sim.cache_salt
        )
        r.block_hashes.extend(values)
        r.hash_state = state

    # -- the step -------------------------------------------------------------------------------

    def begin_step(self, now: float) -> float:
        """Schedule one step at virtual time `now`; returns its duration in seconds.

        Raises:
            RuntimeError: A step is already in progress.
        """
        if self._in_step:
            raise RuntimeError("finish_step must be called before the next begin_step")
        self._in_step = True
        plan = _StepPlan(self.max_num_batched_tokens)
        preempted = self._schedule_running(plan)
        if not preempted:
            self._schedule_waiting(plan)
        self._scheduled = plan.scheduled
        duration = self.profile.step_time(plan.cost())
        self.stats.steps += 1
        self.stats.busy_time += duration
        return duration

    def _schedule_running(self, plan: _StepPlan) -> bool:
        """Schedule the running requests in order; returns whether one had to be preempted."""
        # NOTE: this loop runs for every running request of every step: the plan's counters
        # live in locals here and are written back once.
        bs = self.block_size
        pool = self.pool
        budget = plan.budget
        append = plan.scheduled.append
        tokens, pairs, ctx, sampled = 0, 0.0, 0, 0
        preempted = False
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            c = r.num_computed_tokens
            n = r.num_tokens - c
            if n <= 0:
                i += 1
                continue
            if n > budget:
                n = budget
            need = (c + n + bs - 1) // bs - len(r.blocks)
            if need > 0:
                while need > len(pool.free):
                    victim = running.pop()
                    self._preempt(victim)
                    preempted = True
                    if victim is r:
                        break
                if r.status is not RequestStatus.RUNNING:
                    break
                r.blocks.extend(pool.get_new_blocks(need))
            full = (c + n) // bs
            if full > r.num_cached_blocks:
                self._cache_blocks(r, full)
            r.num_computed_tokens = c + n
            append((r, n))
            budget -= n
            tokens += n
            ctx += c
            pairs += n * c + n * (n + 1) / 2
            if c + n == r.num_tokens:
                sampled += 1
            i += 1
        plan.add(budget, tokens, pairs, ctx, sampled)
        return preempted

    def _schedule_waiting(self, plan: _StepPlan) -> None:
        """Admit waiting requests FCFS, each from its longest prefix-cache hit, while the
        budget, ``max_num_seqs`` and free blocks allow; a head that does not fit blocks."""
        bs = self.block_size
        pool = self.pool
        budget = plan.budget
        append = plan.scheduled.append
        tokens, pairs, ctx, sampled = 0, 0.0, 0, 0
        running = self.running
        waiting = self.waiting
        while waiting and budget > 0 and len(running) < self.max_num_seqs:
            r = waiting[0]
            hits = self._admissible_hit(r, budget)
            if hits is None:
                break
            c = len(hits) * bs
            n = min(r.num_tokens - c, budget)
            waiting.popleft()
            pool.touch(hits)
            hits.extend(pool.get_new_blocks((c + n + bs - 1) // bs - len(hits)))
            r.blocks = hits
            r.num_cached_blocks = c // bs
            full = (c + n) // bs
            if full > r.num_cached_blocks:
                self._cache_blocks(r, full)
            self._count_prefix_lookup(r, c)
            r.status = RequestStatus.RUNNING
            r.num_computed_tokens = c + n
            running.append(r)
            append((r, n))
            budget -= n
            tokens += n
            ctx += c
            pairs += n * c + n * (n + 1) / 2
            if c + n == r.num_tokens:
                sampled += 1
        plan.add(budget, tokens, pairs, ctx, sampled)

    def _admissible_hit(self, r: EngineRequest, budget: int) -> list[int] | None:
        """The blocks of `r`'s longest prefix-cache hit when `r` fits in the free blocks with
        its chunk of `budget` tokens, else None (it stays at the head of the queue)."""
        bs = self.block_size
        pool = self.pool
        max_hits = (r.num_tokens - 1) // bs
        # Fewest new blocks any hit could leave to allocate: when even that does not fit,
        # skip the hit lookup (same outcome, and a blocked head retries every step).
        c = max_hits * bs
        if (c + min(r.num_tokens - c, budget) + bs - 1) // bs - max_hits > len(pool.free):
            return None
        hits = pool.longest_hit(r.block_hashes, max_hits)
        c = len(hits) * bs
        n = min(r.num_tokens - c, budget)
        new_blocks = (c + n + bs - 1) // bs - len(hits)
        ref_cnt = pool.ref_cnt
        evictable = 0
        for b in hits:
            if ref_cnt[b] == 0:
                evictable += 1
        if new_blocks + evictable > len(pool.free):
            return None
        return hits

    def _count_prefix_lookup(self, r: EngineRequest, hit_tokens: int) -> None:
        """vLLM's prefix-cache counters for an admission (resumes after preemption apart)."""
        stats = self.stats
        if r.preemptions:
            stats.preempted_prefix_queries += r.num_tokens
            stats.preempted_prefix_hits += hit_tokens
        else:
            stats.prefix_queries += r.num_tokens
            stats.prefix_hits += hit_tokens
        if r.num_cached_tokens < 0:
            r.num_cached_tokens = hit_tokens

    def _cache_blocks(self, r: EngineRequest, full: int) -> None:
        """Cache (and announce) `r`'s blocks that are full once this step's tokens are in."""
        sim = r.sim
        self.pool.cache_full_blocks(
            r.blocks,
            r.block_hashes,
            r.num_cached_blocks,
            full,
            r.tokens,
            sim.lora_name,
            sim.lora_id,
            sim.cache_salt,
            sim.session_id,
        )
        r.num_cached_blocks = full

    def _preempt(self, r: EngineRequest) -> None:
        self.pool.free_blocks(reversed(r.blocks))
        r.blocks = []
        r.num_cached_blocks = 0
        r.num_computed_tokens = 0
        r.status = RequestStatus.PREEMPTED
        r.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(r)

    def finish_step(self, now: float) -> StepOutput:
        """Apply the scheduled step's results at virtual time `now` (the step's end).

        Raises:
            RuntimeError: No step is in progress.
        """
        if not self._in_step:
            raise RuntimeError("begin_step was not called")
        self._in_step = False
        out = StepOutput()
        bs = self.block_size
        finished = out.finished
        stats = self.stats
        sampled = 0
        for r, _n in self._scheduled:
            if r.status is not RequestStatus.RUNNING or r.num_computed_tokens != r.num_tokens:
                continue
            r.num_tokens += 1
            r.num_output_tokens += 1
            sampled += 1
            if r.first_token_time is None:
                r.first_token_time = now
                out.first_tokens.append(r)
                stats.prompt_tokens += r.num_prompt_tokens
                stats.prompt_tokens_cached += max(r.num_cached_tokens, 0)
            if r.num_tokens % bs == 0:
                self._extend_hashes(r)
            if r.num_output_tokens >= r.max_tokens:
                r.status = RequestStatus.FINISHED
                r.finish_time = now
                finished.append(r)
        self._scheduled = []
        if finished:
            pool = self.pool
            for r in finished:
                pool.free_blocks(reversed(r.blocks))
                r.blocks = []
            self.running = [r for r in self.running if r.status is RequestStatus.RUNNING]
        out.sampled = sampled
        stats.generated_tokens += sampled
        out.events = self.pool.take_events()
        return out
