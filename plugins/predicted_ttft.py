"""``predicted-ttft-scorer``: scores each candidate by the time to first token it would give.

For a request r and a candidate pod p the scorer predicts

    TTFT(p) = base(p) + max(queued(p) / rate(p), memory_wait(r, p)) + uncached(r, p) / rate(p)

* ``queued(p)``: prompt tokens of the requests already sent to p that have not produced their
  first token yet (the scheduler's own ledger, `InFlightLedger`): vLLM serves its waiting queue
  first come, first served, so r's prefill starts after theirs.
* ``uncached(r, p)``: r's prompt tokens p does not hold, from the exact index's match info
  (``prefixMatchInfoProducerName``); blocks that only the routing history (``priorProducerName``)
  places on p count as held with probability ``priorWeight``.
* ``rate(p)``, ``base(p)``: p's prefill rate (tokens/s) and fixed latency, learned online from
  the TTFTs observed at first tokens: ``y = base + x / rate`` fitted by exponentially weighted
  sums (half-life ``learningHalfLife`` samples), starting from ``prefillTokensPerSecond`` and
  ``baseLatency``; each pod's fit is shrunk toward the fleet's.
* ``memory_wait(r, p)``: when the KV tokens p's in-flight requests will hold (uncached prompt +
  expected output; at least the scraped ``kv_cache_usage_perc`` plus what was sent since that
  scrape) plus r's exceed ``memoryHeadroom`` of p's KV capacity, r waits until the decoding
  requests free the excess (they free their share of the held tokens per learned decode time).
  It overlaps the prefill of the requests ahead, hence the ``max``.

The pick is made on a cost: ``TTFT(p) + (workWeight + externality x waiting(p)) x
uncached(r, p) / rate(p) + evict(r, p)``. Moving a long session costs its re-prefill in r's own
TTFT, and again as work: the pod is busy longer for everyone (``waiting(p)``: requests waiting
there for a first token) and holds a second copy of the context. Waiting behind short requests
costs their prefill. ``evict(r, p)`` is what r's context will cost later if p evicts it before
it is read again (the next turn of a conversation):

    evict(r, p) = reuseWeight x exp(-retention(p) / reuseInterval) x (prompt + output) / rate(p)
    retention(p) = (capacity(p) - held(p)) / churn(p)

vLLM evicts the least recently used free blocks, so a block written now survives about
``retention(p)`` seconds: the KV memory its in-flight requests leave free (``held(p)`` as in the
memory term) over the KV tokens it writes per second (``churn(p)``: uncached prompt + expected
output of the requests sent to it, decayed exponentially with time constant ``churnWindow``;
a pod with no free memory has a retention of 0). With reuse after an
exponential time of mean ``reuseInterval``, ``exp(-retention / reuseInterval)`` is the chance
the context is gone by then; ``reuseWeight`` later requests would then compute it again. On a
pod with room to spare the term vanishes; when the fleet's cache cannot hold every live context,
it steers new contexts to the pods that keep theirs longest. All terms are seconds, so they
compare directly.

Score: ``(min_p cost + scale) / (cost(p) + scale)`` in (0, 1], 1 for the cheapest pod;
``scoreScale`` sets how much a difference in seconds moves the score when composed with other
scorers. Alone with ``max-score-picker`` it picks the lowest cost.

As flow control's saturation detector it reports the fill of the emptiest pod (in-flight KV
over capacity, at least 1.0 while vLLM queues requests there): the gateway holds a request only
while every pod would make it wait in its own queue, and routes it when the first has room.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import Field, field_validator

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler import (
    Endpoint,
    PluginContext,
    PluginRegistry,
    ResponseInfo,
    SchedulingContext,
    SchedulingRequest,
    SchedulingResult,
    parse_duration,
)
from kvaware_scorer.scheduler.inflight import (
    InFlight,
    InFlightLedger,
    read_match_info,
    uncached_tokens,
)
from kvaware_scorer.scheduler.matchinfo import MatchInfoProducer, default_source, producer

__all__ = ["PredictedTTFTParams", "PredictedTTFTScorer", "PrefillModel", "register"]

logger = logging.getLogger(__name__)

#: Pods whose KV churn is tracked at most (the pool's pods; see `PredictedTTFTScorer._wrote`).
MAX_CHURN_PODS = 4096
#: First tokens observed (over the fleet) before a predicted TTFT is taken as the end of a
#: prefill nobody sees (a whole-body answer's; `PrefillModel.calibrated`).
CALIBRATED_AFTER = 16


class PredictedTTFTParams(ConfigModel):
    """Parameters of ``predicted-ttft-scorer``.

    Attributes:
        prefix_match_info_producer_name: The exact prefix index to read (a
            ``precise-prefix-cache-scorer`` / ``-producer``); empty = the one prefix plugin
            configured (none: every prompt token counts as uncached).
        prior_producer_name: A routing-history producer (``approx-prefix-cache-producer``)
            whose matches beyond the exact index's count as held with `prior_weight`.
        prior_weight: Probability that blocks only the routing history places on a pod are
            still there (0 = ignore the history).
        prefill_tokens_per_second: Prefill rate assumed before any TTFT was observed.
        base_latency: Fixed TTFT part (seconds) assumed before any TTFT was observed.
        learning_half_life: Observations after which an old one weighs half (0 = no learning:
            the two values above are used as they are).
        expected_output_tokens: Output tokens assumed per request before any completed
            (then the mean of the completed ones, same half-life).
        kv_capacity_tokens: KV-cache tokens per pod; 0 = from the scraped
            ``vllm:cache_config_info`` (unknown: no memory term).
        memory_headroom: Fraction of the KV capacity in-flight requests may fill before new
            ones wait.
        decode_seconds: Decode time (first token to end) assumed before any completed.
        work_weight: Weight of the prefill seconds a pick adds to the pod beyond the request's
            own TTFT: the pod is busy that much longer for everyone, and the tokens it
            computes again are a second copy in the fleet's KV cache (0 = greedy on TTFT).
        externality: Weight of the delay a pick imposes on the requests that will queue
            behind it: the request's own prefill seconds on the pod times the requests waiting
            there for their first token (none on an idle pod; growing with its queue, where
            every re-prefill delays the others).
        score_scale: Seconds added to both sides of the score ratio.
        metrics_interval: Seconds between the pod-metrics scrapes this scorer asks for (KV
            usage and cache size correct its own accounting); 0 = needs no scraping.
        request_timeout: Seconds after which a request whose end was never reported stops
            counting (0 = never).
        max_tracked_requests: Bound on the requests the ledger tracks.
        reuse_interval: Mean seconds until a request's context is read again (a conversation's
            next turn: the user's think time plus the answer); 0 = no eviction term.
        reuse_weight: Later requests expected to compute a context again when its pod evicts it
            before that (0 = no eviction term).
        churn_window: Time constant (seconds) of the exponential decay that averages each pod's
            rate of newly written KV tokens.
    """

    prefix_match_info_producer_name: str | None = None
    prior_producer_name: str | None = None
    prior_weight: float = Field(0.5, ge=0, le=1)
    prefill_tokens_per_second: float = Field(10000.0, gt=0)
    base_latency: float = Field(0.02, ge=0)
    learning_half_life: int = Field(64, ge=0)
    expected_output_tokens: int = Field(256, ge=0)
    kv_capacity_tokens: int = Field(0, ge=0)
    memory_headroom: float = Field(0.95, gt=0, le=1)
    decode_seconds: float = Field(10.0, gt=0)
    work_weight: float = Field(1.0, ge=0)
    externality: float = Field(1.0, ge=0)
    score_scale: float = Field(0.05, gt=0)
    metrics_interval: float = Field(1.0, ge=0)
    request_timeout: float = 300.0
    max_tracked_requests: int = Field(65536, ge=1)
    reuse_interval: float = Field(20.0, ge=0, allow_inf_nan=False)
    reuse_weight: float = Field(4.0, ge=0, allow_inf_nan=False)
    churn_window: float = Field(30.0, gt=0, allow_inf_nan=False)

    @field_validator(
        "request_timeout",
        "base_latency",
        "decode_seconds",
        "metrics_interval",
        "score_scale",
        "reuse_interval",
        "churn_window",
        mode="before",
    )
    @classmethod
    def _duration(cls, value: object) -> float:
        return parse_duration(value)


@dataclass(slots=True)
class _Fit:
    """Exponentially weighted sums of (x, y) observations for ``y = a + x / rate``."""

    w: float = 0.0
    x: float = 0.0
    y: float = 0.0
    xx: float = 0.0
    xy: float = 0.0

    def add(self, x: float, y: float, decay: float) -> None:
        self.w = self.w * decay + 1.0
        self.x = self.x * decay + x
        self.y = self.y * decay + y
        self.xx = self.xx * decay + x * x
        self.xy = self.xy * decay + x * y


class PrefillModel:
    """Per-pod online fit of ``TTFT = base + work_tokens / rate`` (thread-safe).

    A pod's fit is shrunk toward the fleet-wide fit (worth `half_life` observations); the
    fleet-wide fit starts from the configured prior, which weighs as `prior_weight`
    observations and fades like them.

    Args:
        rate: Prior prefill rate (tokens/s).
        base: Prior fixed latency (s).
        half_life: Observations after which one weighs half (0 = keep the prior).
        prior_weight: Observations the prior is worth.
    """

    def __init__(self, rate: float, base: float, half_life: int, prior_weight: float = 4.0) -> None:
        self.prior_rate = rate
        self.prior_base = base
        self.decay = 0.5 ** (1.0 / half_life) if half_life > 0 else 1.0
        self.learning = half_life > 0
        self.prior_weight = prior_weight
        # NOTE: a pod's own fit leans on the fleet's with as many pseudo-observations as a
        # half-life holds: pods of one pool are alike, and noise in one pod's estimate must
        # not make it look faster than its peers (it would then win every tie and pile up
        # work) or slower (it would starve and never be measured again).
        self.pod_prior_weight = float(max(half_life, 1))
        self._lock = threading.Lock()
        self._fleet = _Fit()
        self._pods: dict[str, _Fit] = {}
        self._cache: dict[str, tuple[float, float]] = {}
        self._count = 0

    def observe(self, pod: str, work_tokens: float, ttft: float) -> None:
        """One request's prefill of `work_tokens` (its own and those queued before it) took
        `ttft` seconds on `pod`."""
        if not self.learning or ttft <= 0 or not math.isfinite(ttft):
            return
        with self._lock:
            self._count += 1
            self._fleet.add(work_tokens, ttft, self.decay)
            fit = self._pods.get(pod)
            if fit is None:
                fit = self._pods[pod] = _Fit()
            fit.add(work_tokens, ttft, self.decay)
            self._cache.clear()

    def forget(self, pod: str) -> None:
        """Drop `pod`'s own fit (it left the pool; the fleet's fit keeps what it taught)."""
        with self._lock:
            self._pods.pop(pod, None)
            self._cache.clear()

    def observations(self) -> int:
        """Observations made so far (over the whole fleet)."""
        with self._lock:
            return self._count

    def calibrated(self) -> bool:
        """Whether its predictions rest on the pods' own TTFTs: `CALIBRATED_AFTER` first
        tokens observed over the fleet, or learning off (the configured rate is trusted)."""
        return not self.learning or self.observations() >= CALIBRATED_AFTER

    def params(self, pod: str) -> tuple[float, float]:
        """(base seconds, rate tokens/s) for `pod`."""
        cached = self._cache.get(pod)
        if cached is not None:
            return cached
        with self._lock:
            fleet = self._solve(self._fleet, self.prior_base, self.prior_rate)
            fit = self._pods.get(pod)
            out = fleet if fit is None else self._solve(fit, *fleet, self.pod_prior_weight)
            self._cache[pod] = out
        return out

    def _solve(
        self, fit: _Fit, base0: float, rate0: float, weight: float | None = None
    ) -> tuple[float, float]:
        # NOTE: least squares with the prior as `weight` pseudo-observations on the prior line
        # (at x = 0 and at x = one second of prefill): with few or clustered observations the
        # slope stays near the prior instead of swinging wildly.
        k = (self.prior_weight if weight is None else weight) / 2.0
        x1 = rate0  # one second of prefill
        w = fit.w + 2 * k
        sx = fit.x + k * x1
        sy = fit.y + k * base0 + k * (base0 + 1.0)
        sxx = fit.xx + k * x1 * x1
        sxy = fit.xy + k * x1 * (base0 + 1.0)
        var = sxx - sx * sx / w
        if var <= 0:
            return base0, rate0
        slope = (sxy - sx * sy / w) / var
        if slope <= 0:
            return base0, rate0
        base = max(0.0, (sy - slope * sx) / w)
        return base, 1.0 / slope


class PredictedTTFTScorer:
    """``predicted-ttft-scorer`` (see the module docstring)."""

    #: As a saturation detector its ledger counts a request once it is scheduled
    #: (pre-request), so flow control waits for that before the next look.
    counts_scheduled = True

    def __init__(self, params: PredictedTTFTParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.params = params
        self.metrics_interval: float | None = params.metrics_interval or None
        self._scheduler = ctx.scheduler
        self.ledger = InFlightLedger(
            timeout=params.request_timeout, max_tracked=params.max_tracked_requests
        )
        self.model = PrefillModel(
            params.prefill_tokens_per_second, params.base_latency, params.learning_half_life
        )
        self._lock = threading.Lock()
        decay = 0.5 ** (1.0 / params.learning_half_life) if params.learning_half_life > 0 else 1.0
        self._decay = decay
        self._out_w = 0.0
        self._out_sum = 0.0
        self._res: dict[str, tuple[float, float]] = {}  # pod -> (weight, weighted decode s)
        self._scrape_seen: dict[str, float] = {}
        self._source: MatchInfoProducer | None = None
        self._prior: MatchInfoProducer | None = None
        self._resolved = False
        self._key = ctx.name + ":ttft"
        self._churn: dict[str, tuple[float, float]] = {}  # pod -> (decayed tokens, at when)

    # -- KV churn -------------------------------------------------------------------------------

    def _wrote(self, pod: str, now: float, tokens: float) -> None:
        """Count `tokens` new KV tokens written on `pod` at `now`."""
        window = self.params.churn_window
        with self._lock:
            total, at = self._churn.get(pod, (0.0, now))
            if pod not in self._churn and len(self._churn) >= MAX_CHURN_PODS:
                # NOTE: pods leave through endpoints_changed; this bounds picks of endpoints
                # outside the pool (a caller's own list) by dropping the longest-quiet one.
                del self._churn[min(self._churn, key=lambda k: self._churn[k][1])]
            # NOTE: a late write (an older clock reading) is added without moving time back.
            decayed = total * math.exp(-max(0.0, now - at) / window)
            self._churn[pod] = (decayed + tokens, max(at, now))

    def churn(self, pod: str, now: float) -> float:
        """New KV tokens per second written on `pod` lately (uncached prompts + output)."""
        window = self.params.churn_window
        with self._lock:
            total, at = self._churn.get(pod, (0.0, now))
        return total * math.exp(-max(0.0, now - at) / window) / window

    def _evict_cost(self, pod: str, now: float, room: float, context: int, rate: float) -> float:
        """Seconds `context` tokens left on `pod` will cost later if it evicts them first."""
        p = self.params
        if p.reuse_interval <= 0 or p.reuse_weight <= 0:
            return 0.0
        if room <= 0:
            risk = 1.0  # no free memory: the context goes first (whoever filled the pod)
        else:
            churn = self.churn(pod, now)
            if churn <= 0:
                return 0.0
            risk = math.exp(-room / churn / p.reuse_interval)
        return p.reuse_weight * risk * context / rate

    # -- sources --------------------------------------------------------------------------------

    def _resolve(self, ctx: SchedulingContext) -> None:
        if self._resolved:
            return
        sched = ctx.scheduler or self._scheduler
        p = self.params
        if sched is not None:
            name = p.prefix_match_info_producer_name or default_source(sched.config, self.name)
            if name is not None:
                self._source = producer(sched.plugins, name, self.name)
            if p.prior_producer_name:
                try:
                    self._prior = producer(sched.plugins, p.prior_producer_name, self.name)
                except ConfigError as exc:
                    raise ConfigError(exc.message, "priorProducerName") from exc
        elif p.prefix_match_info_producer_name or p.prior_producer_name:
            raise ConfigError("no scheduler to find the producer in", "prefixMatchInfoProducerName")
        self._resolved = True

    # -- the model ------------------------------------------------------------------------------

    def expected_output(self) -> int:
        """Output tokens expected for a new request."""
        with self._lock:
            if self._out_w <= 0:
                return self.params.expected_output_tokens
            return round(self._out_sum / self._out_w)

    def decode_time(self, pod: str) -> float:
        """Mean seconds a request decodes on `pod` (first token to end)."""
        with self._lock:
            w, s = self._res.get(pod, (0.0, 0.0))
        return s / w if w > 0 else self.params.decode_seconds

    def capacity(self, ctx: SchedulingContext, endpoint: Endpoint) -> int | None:
        """KV-cache tokens of `endpoint` (configured, else scraped), or None when unknown."""
        if self.params.kv_capacity_tokens:
            return self.params.kv_capacity_tokens
        m = endpoint.metrics
        if m.cache_num_blocks and m.cache_block_size:
            return m.cache_num_blocks * m.cache_block_size
        return None

    def _kv_in_flight(self, ctx: SchedulingContext, endpoint: Endpoint, own: int) -> int:
        """KV tokens `endpoint` will hold for its in-flight requests: the ledger's account,
        or the scraped usage plus what was sent since that scrape when that is more."""
        m = ctx.metrics(endpoint)
        if m is not None and m.update_time > 0 and m.cache_num_blocks and m.cache_block_size:
            if self._scrape_seen.get(endpoint.id) != m.update_time:
                self._scrape_seen[endpoint.id] = m.update_time
                self.ledger.mark_scraped(endpoint.id)
            scraped = m.kv_cache_usage_percent * m.cache_num_blocks * m.cache_block_size
            return max(own, int(scraped) + self.ledger.kv_tokens_since_scrape(endpoint.id))
        return own

    def predict(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> dict[str, tuple[float, int, int, float, float]]:
        """Endpoint id -> (predicted TTFT s, uncached tokens, work tokens, memory wait s, cost s:
        the TTFT plus the delay the pick imposes on requests queueing behind it)."""
        self._resolve(ctx)
        p = self.params
        info = read_match_info(self._source, ctx, request, endpoints)
        prior = read_match_info(self._prior, ctx, request, endpoints) if self._prior else None
        n, uncached = uncached_tokens(
            request, info, endpoints, prior=prior, prior_weight=p.prior_weight
        )
        out_tokens = self.expected_output()
        out: dict[str, tuple[float, int, int, float, float]] = {}
        n = n or max(uncached.values(), default=0)
        loads = {e.id: self.ledger.load(e.id) for e in endpoints}
        for e in endpoints:
            load = loads[e.id]
            own = uncached[e.id]
            work = load.prefill_tokens + own
            base, rate = self.model.params(e.id)
            queued = load.prefill_tokens / rate
            wait = 0.0
            evict = 0.0
            cap = self.capacity(ctx, e)
            if cap:
                held = self._kv_in_flight(ctx, e, load.kv_tokens)
                evict = self._evict_cost(e.id, ctx.now, cap - held, n + out_tokens, rate)
                excess = held + own + out_tokens - cap * p.memory_headroom
                decoding = load.requests - load.prefilling
                if excess > 0 and decoding > 0:
                    # NOTE: a full pod admits the requests waiting for KV memory (this one
                    # last) as its decoding requests leave and free their tokens: about
                    # held x decoding / requests tokens per decode time. A request whose
                    # prefix the pod holds needs less memory there, so it is admitted sooner.
                    freed = max(1.0, held * decoding / load.requests) / self.decode_time(e.id)
                    wait = excess / freed
            # NOTE: the prefill of the requests ahead overlaps the wait for memory.
            ttft = base + max(queued, wait) + own / rate
            wait = max(0.0, wait - queued)
            weight = p.work_weight + p.externality * load.prefilling
            out[e.id] = (ttft, own, work, wait, ttft + weight * own / rate + evict)
        return out

    # -- roles ----------------------------------------------------------------------------------

    def saturated(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> float:
        """Flow control's gate (role ``saturation-detector``): the fill of the emptiest pod,
        ``>= 1.0`` when every pod would make a new request wait in its own queue.

        A pod's fill is the KV tokens its in-flight requests will hold at their end (as the
        memory term counts them) over its KV capacity, and at least 1.0 while vLLM reports
        requests waiting there. A pod whose metrics or capacity are unknown counts as empty:
        without them the gate never holds a request.
        """
        best = 1.0
        for e in endpoints:
            m = ctx.metrics(e)
            cap = self.capacity(ctx, e) if m is not None and m.update_time > 0 else None
            if m is None or not cap:
                return 0.0
            fill = self._kv_in_flight(ctx, e, self.ledger.load(e.id).kv_tokens) / cap
            if m.waiting_queue_size > 0:
                fill = max(fill, 1.0)
            best = min(best, fill)
        return best

    def score(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Mapping[str, float]:
        if self.ledger.timeout > 0:
            self.ledger.expire(ctx.now)
        pred = self.predict(ctx, request, endpoints)
        request.state[self._key + ":pred"] = pred
        if not pred:
            return {}
        best = min(v[4] for v in pred.values())
        scale = self.params.score_scale
        return {eid: (best + scale) / (v[4] + scale) for eid, v in pred.items()}

    def pre_request(
        self, ctx: SchedulingContext, request: SchedulingRequest, result: SchedulingResult
    ) -> None:
        """Admit the request against its target in the ledger (a re-schedule moves it)."""
        old = request.state.pop(self._key, None)
        if old is not None:
            self.ledger.release(old)
        target = result.targets[0]
        pred = request.state.pop(self._key + ":pred", None)
        entry = pred.get(target.id) if pred else None
        if entry is None:
            # NOTE: another profile or a retry picked a pod this scorer did not score.
            entry = self.predict(ctx, request, [target])[target.id]
        ttft, own, work, wait, _ = entry
        n = len(request.token_ids) if request.token_ids is not None else own
        output = self.expected_output()
        self._wrote(target.id, ctx.now, own + output)
        request.state[self._key] = self.ledger.admit(
            InFlight(
                pod=target.id,
                prefill=own,
                prompt=max(n, own),
                output=output,
                start=ctx.now,
                ahead=work,
                predicted=ttft,
                memory_wait=wait,
                # NOTE: a whole-body answer reports no first token; once observed first
                # tokens calibrate the model, its prefill counts as done when this prediction
                # says it is. Before that (e.g. only non-streaming clients), it counts as
                # queued until its end: an uncalibrated prior can be 10x off, and ending the
                # prefill that early hides the pod's backlog.
                due=ctx.now + ttft
                if request.streaming is False and self.model.calibrated()
                else 0.0,
            )
        )

    def first_token(self, now: float, request: SchedulingRequest, result: SchedulingResult) -> None:
        """The prefill is over: stop counting it as queued, and learn from its TTFT."""
        key = request.state.get(self._key)
        if key is None:
            return
        entry = self.ledger.first_token(key)
        if entry is None:
            return
        entry.first = now
        if entry.memory_wait <= 0:
            # NOTE: only waits the prefill model explains teach it; a wait for KV memory is
            # the memory term's, and would read as a slow prefill rate.
            self.model.observe(entry.pod, entry.ahead, now - entry.start)

    def post_response(
        self, request: SchedulingRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        key = request.state.pop(self._key, None)
        if key is None:
            return
        entry = self.ledger.release(key)
        if entry is None:
            return
        now = self._scheduler.clock() if self._scheduler is not None else entry.start
        with self._lock:
            d = self._decay
            if response.status == 200 and response.completion_tokens > 0:
                self._out_w = self._out_w * d + 1.0
                self._out_sum = self._out_sum * d + response.completion_tokens
                if entry.first > 0:
                    w, s = self._res.get(entry.pod, (0.0, 0.0))
                    self._res[entry.pod] = (w * d + 1.0, s * d + max(0.0, now - entry.first))

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        """Forget pods that left the pool."""
        gone = [e.id for e in removed]
        if gone:
            self.ledger.forget_pods(gone)
            for pod in gone:
                self.model.forget(pod)
            with self._lock:
                for pod in gone:
                    self._res.pop(pod, None)
                    self._scrape_seen.pop(pod, None)
                    self._churn.pop(pod, None)


def register(registry: PluginRegistry) -> None:
    """Register ``predicted-ttft-scorer``."""
    registry.register(
        "predicted-ttft-scorer",
        PredictedTTFTScorer,
        params=PredictedTTFTParams,
        kinds=("scorer", "pre-request", "post-response", "saturation-detector"),
        description="lowest predicted time to first token (queue + uncached prefill + KV wait)",
    )
