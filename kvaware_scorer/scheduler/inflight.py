"""In-flight work per endpoint, from the request lifecycle the scheduler sees (no scraping).

`InFlightLedger` is the accounting that ``token-load-scorer``, ``prefix-cache-affinity-filter``
and ``predicted-ttft-scorer`` read: every scheduled request is *admitted* against its target
with the prompt tokens the target must still compute (uncached at the pick) and its expected
output; its prefill is *done* at its first token (`FirstTokenListener`), and it is *released*
after the response (`PostResponse`). An answer that is not streamed reports no first token: its
entry carries a *due* time (the pick plus the TTFT predicted for it) at which its prefill counts
as done (`InFlightLedger.settle`). A request never released expires after a timeout, and the
number of tracked requests is bounded (the oldest are dropped first, counted).

The helpers at the end read a prefix producer's match info (`MatchInfo`) as token counts.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvaware_scorer.errors import KVAwareError
from kvaware_scorer.scheduler.matchinfo import MatchInfo, MatchInfoProducer
from kvaware_scorer.scheduler.types import Endpoint, SchedulingContext, SchedulingRequest

__all__ = [
    "DEFAULT_MAX_TRACKED",
    "InFlight",
    "InFlightLedger",
    "PodLoad",
    "prompt_tokens",
    "read_match_info",
    "uncached_tokens",
]

logger = logging.getLogger(__name__)

#: Requests tracked per ledger at most (beyond it the oldest are forgotten, as if released).
DEFAULT_MAX_TRACKED = 65536


@dataclass(slots=True)
class InFlight:
    """One scheduled request as the ledger counts it.

    Attributes:
        pod: Endpoint id it was sent to.
        prefill: Prompt tokens the pod had to compute (uncached at the pick).
        prompt: Whole prompt tokens.
        output: Output tokens expected (an estimate).
        start: Scheduler time of the pick.
        ahead: Prefill tokens queued on the pod before it, plus its own (at the pick).
        predicted: TTFT predicted at the pick (seconds; 0 when nobody predicted).
        memory_wait: The part of `predicted` due to a full KV cache.
        epoch: The pod's scrape epoch at admission (set by the ledger).
        prefilling: True until its first token.
        first: Scheduler time of its first token (0 before).
        due: Scheduler time at which its prefill counts as done although no first token was
            reported (an answer that is not streamed); 0 = only at its first token.
    """

    pod: str
    prefill: int
    prompt: int
    output: int
    start: float
    ahead: int = 0
    predicted: float = 0.0
    memory_wait: float = 0.0
    epoch: int = 0
    prefilling: bool = True
    first: float = 0.0
    due: float = 0.0


@dataclass(slots=True)
class PodLoad:
    """An endpoint's in-flight work (sums over its tracked requests).

    Attributes:
        requests: Requests in flight.
        prefill_tokens: Prompt tokens still to prefill (requests before their first token).
        tokens: Uncached prompt tokens of every in-flight request (upstream's in-flight
            tokens), plus expected output tokens when the ledger counts them.
        kv_tokens: KV-cache tokens the in-flight requests will hold at their end (uncached
            prompt + expected output; a cached prefix shared with other requests is not
            counted again).
        prefilling: Requests before their first token.
        epoch: Metrics scrapes of the pod seen (`InFlightLedger.mark_scraped`).
        kv_since_scrape: `kv_tokens` of the requests admitted since the last scrape.
    """

    requests: int = 0
    prefill_tokens: int = 0
    tokens: int = 0
    kv_tokens: int = 0
    prefilling: int = 0
    epoch: int = 0
    kv_since_scrape: int = 0


class InFlightLedger:
    """Thread-safe in-flight accounting keyed by a per-admission token.

    Args:
        timeout: Seconds (scheduler clock) after which an unreleased request stops counting
            (0 = never).
        max_tracked: Bound on tracked requests (oldest dropped first).
        count_output: Whether `PodLoad.tokens` includes expected output tokens.
    """

    def __init__(
        self,
        *,
        timeout: float = 300.0,
        max_tracked: int = DEFAULT_MAX_TRACKED,
        count_output: bool = False,
    ) -> None:
        self.timeout = timeout
        self.max_tracked = max(1, max_tracked)
        self.count_output = count_output
        self.dropped = 0  # requests forgotten because of the bound or the timeout
        self._lock = threading.Lock()
        self._live: OrderedDict[int, InFlight] = OrderedDict()  # admission order = age
        self._pods: dict[str, PodLoad] = {}
        self._ids = itertools.count(1)
        # (due, key) of entries whose prefill ends at a due time; released entries leave
        # lazily, and the heap is rebuilt from the live ones when it outgrows them
        # (at most 2 x max_tracked + 64 items).
        self._due: list[tuple[float, int]] = []

    # -- writes ---------------------------------------------------------------------------------

    def admit(self, entry: InFlight) -> int:
        """Count `entry` against its pod; returns the key to release it with."""
        with self._lock:
            key = next(self._ids)
            self._live[key] = entry
            load = self._pods.get(entry.pod)
            if load is None:
                load = self._pods[entry.pod] = PodLoad()
            load.requests += 1
            load.prefilling += 1
            load.prefill_tokens += entry.prefill
            load.tokens += entry.prefill + (entry.output if self.count_output else 0)
            load.kv_tokens += entry.prefill + entry.output
            entry.epoch = load.epoch
            load.kv_since_scrape += entry.prefill + entry.output
            while len(self._live) > self.max_tracked:
                _, old = self._live.popitem(last=False)
                self._uncount(old)
                self.dropped += 1
            if entry.due > 0:
                if len(self._due) < 2 * self.max_tracked + 64:
                    heapq.heappush(self._due, (entry.due, key))
                else:  # mostly released entries: keep the live ones (this one included)
                    self._due = [
                        (e.due, k) for k, e in self._live.items() if e.due > 0 and e.prefilling
                    ]
                    heapq.heapify(self._due)
            return key

    def first_token(self, key: int) -> InFlight | None:
        """The request's prefill is over; returns its entry (None when not tracked)."""
        with self._lock:
            entry = self._live.get(key)
            if entry is None or not entry.prefilling:
                return None
            self._prefilled(entry)
            return entry

    def _prefilled(self, entry: InFlight) -> None:
        entry.prefilling = False
        load = self._pods.get(entry.pod)
        if load is not None:
            load.prefilling -= 1
            load.prefill_tokens -= entry.prefill

    def settle(self, now: float) -> int:
        """Count the prefill of requests past their due time as done (answers that are not
        streamed report no first token); returns how many."""
        n = 0
        with self._lock:
            due = self._due
            while due and due[0][0] <= now:
                _, key = heapq.heappop(due)
                entry = self._live.get(key)
                if entry is not None and entry.prefilling:
                    self._prefilled(entry)
                    n += 1
        return n

    def release(self, key: int) -> InFlight | None:
        """The request ended; returns its entry (None when not tracked)."""
        with self._lock:
            entry = self._live.pop(key, None)
            if entry is not None:
                self._uncount(entry)
            return entry

    def _uncount(self, entry: InFlight) -> None:
        load = self._pods.get(entry.pod)
        if load is None:
            return
        load.requests -= 1
        if entry.prefilling:
            load.prefilling -= 1
            load.prefill_tokens -= entry.prefill
        load.tokens -= entry.prefill + (entry.output if self.count_output else 0)
        load.kv_tokens -= entry.prefill + entry.output
        if entry.epoch == load.epoch:
            load.kv_since_scrape -= entry.prefill + entry.output
        if load.requests <= 0:
            # NOTE: kept (with its epoch) while scrapes are tracked for it; an empty pod costs
            # one small record and pods leaving the pool are forgotten.
            load.kv_since_scrape = 0

    def expire(self, now: float) -> int:
        """Forget requests older than the timeout, and `settle` the prefills due by `now`;
        returns how many requests were forgotten."""
        if self._due:
            self.settle(now)
        if self.timeout <= 0:
            return 0
        n = 0
        with self._lock:
            live = self._live
            while live:
                key, entry = next(iter(live.items()))
                if now - entry.start < self.timeout:
                    break
                del live[key]
                self._uncount(entry)
                n += 1
            self.dropped += n
        if n:
            logger.debug("%d in-flight request(s) timed out after %.0fs", n, self.timeout)
        return n

    def mark_scraped(self, pod: str) -> None:
        """The pod's metrics were just scraped: its current requests are in them (O(1))."""
        with self._lock:
            load = self._pods.get(pod)
            if load is None:
                load = self._pods[pod] = PodLoad()
            load.epoch += 1
            load.kv_since_scrape = 0

    def forget_pods(self, pods: Sequence[str]) -> None:
        """Drop every request of `pods` (they left the pool)."""
        gone = set(pods)
        with self._lock:
            for key in [k for k, e in self._live.items() if e.pod in gone]:
                del self._live[key]
            if self._due:
                self._due = [(d, k) for d, k in self._due if k in self._live]
                heapq.heapify(self._due)
            for pod in gone:
                self._pods.pop(pod, None)

    # -- reads ----------------------------------------------------------------------------------

    def load(self, pod: str) -> PodLoad:
        """A copy of the pod's in-flight work (zeros when it has none)."""
        with self._lock:
            load = self._pods.get(pod)
            if load is None:
                return PodLoad()
            return PodLoad(
                load.requests,
                load.prefill_tokens,
                load.tokens,
                load.kv_tokens,
                load.prefilling,
                load.epoch,
                load.kv_since_scrape,
            )

    def kv_tokens_since_scrape(self, pod: str) -> int:
        """KV tokens of the pod's requests admitted after its last scrape."""
        with self._lock:
            load = self._pods.get(pod)
            return 0 if load is None else load.kv_since_scrape

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)


# -- reading match info as tokens ---------------------------------------------------------------


def prompt_tokens(request: SchedulingRequest, info: MatchInfo) -> int:
    """The prompt's length in tokens: its token ids when known, else the match info's
    ``total blocks x block size`` (full blocks only)."""
    if request.token_ids is not None:
        return len(request.token_ids)
    if request.has_tokens:
        return len(request.tokens(list))
    _, total, block_size = info
    return total * block_size


def uncached_tokens(
    request: SchedulingRequest,
    info: MatchInfo | None,
    endpoints: Sequence[Endpoint],
    *,
    prior: MatchInfo | None = None,
    prior_weight: float = 0.0,
) -> tuple[int, dict[str, int]]:
    """(prompt tokens, endpoint id -> prompt tokens the endpoint would still compute).

    Matched blocks count as cached; blocks only `prior` (a routing-history producer) says an
    endpoint holds count as cached with weight `prior_weight` (the probability that they are
    still there although the exact index does not know them). vLLM always computes at least
    one token, so nothing is below 1 for a non-empty prompt.
    """
    if info is None:
        n = len(request.token_ids) if request.token_ids is not None else 0
        return n, {e.id: n for e in endpoints}
    n = prompt_tokens(request, info)
    matched, _, block_size = info
    extra: Mapping[str, float] = {}
    prior_bs = block_size
    if prior is not None and prior_weight > 0:
        extra, _, prior_bs = prior[0], prior[1], prior[2]
    out: dict[str, int] = {}
    floor = 1 if n > 0 else 0
    for e in endpoints:
        cached = matched.get(e.id, 0.0) * block_size
        if extra:
            hist = extra.get(e.id, 0.0) * prior_bs
            if hist > cached:
                cached += prior_weight * (hist - cached)
        out[e.id] = max(floor, n - int(cached))
    return n, out


def read_match_info(
    source: MatchInfoProducer | None,
    ctx: SchedulingContext,
    request: SchedulingRequest,
    endpoints: Sequence[Endpoint],
) -> MatchInfo | None:
    """`source`'s match info, or None when there is no source or it cannot tokenize."""
    if source is None:
        return None
    try:
        return source.match_info(ctx, request, endpoints)
    except KVAwareError as exc:
        logger.debug("no prefix match info for %s: %s", request.request_id, exc)
        return None
