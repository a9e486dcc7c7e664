"""The discrete-event simulator's settings and what a run measured.

`FleetConfig` describes the emulated fleet (``fleet.py`` runs it); `RunResult` holds a run's
`RequestRecord` per request plus its fleet-wide counters and samples (``report.py`` reads them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.sim.engine import EngineStats
from kvaware_scorer.sim.profiles import EngineProfile
from kvaware_scorer.sim.workloads import StageWindow

__all__ = ["FleetConfig", "RequestRecord", "RunResult"]


@dataclass
class FleetConfig:
    """The emulated fleet.

    Attributes:
        profile: Every pod's profile.
        num_pods: Pods in the fleet.
        engine_hash: Block hash of the pods (``xxh3`` or vLLM's ``sha256``).
        hash_seed: The pods' PYTHONHASHSEED analogue (empty = unset).
        event_delay_s: Delay from publishing a KV-event payload to its delivery to the sinks.
        metrics_interval_s: Metrics scrape period; 0 = after every step.
        scrape_on_read: Scrape as the live scheduler does (`MetricsScraper`): a scrape
            ``metrics_interval_s`` after the previous one only when the router read the
            metrics since (a routing decision, or flow control looking at held requests), else
            at the next read (at once), and every ``idle_scrape_s`` without reads. False:
            every ``metrics_interval_s`` whatever the router does.
        idle_scrape_s: Scrape period without reads (``scrape_on_read``).
        sample_interval_s: Period of the report's queue / KV-usage samples.
        model: Served model name (default: the profile's model).
        num_gpu_blocks: Override the profile's pool size (tests).
        drain_timeout_s: Stop this long after the last stage ends even if requests remain
            (they are reported as unfinished); None = run until every request finished.
        event_loss: Probability that a published payload never reaches the sinks (its seq is
            still consumed, so consumers see a gap, as with a ZMQ PUB dropping frames).
        seed: Seed of the event-loss draws.
        drain_between_stages: Start each stage only once every earlier request has finished
            (independent stages; see the module docstring).
    """

    profile: EngineProfile
    num_pods: int = 8
    engine_hash: str = "xxh3"
    hash_seed: str = ""
    event_delay_s: float = 0.005
    metrics_interval_s: float = 0.05
    scrape_on_read: bool = True
    idle_scrape_s: float = 1.0
    sample_interval_s: float = 0.5
    model: str | None = None
    num_gpu_blocks: int | None = None
    drain_timeout_s: float | None = None
    event_loss: float = 0.0
    seed: int = 0
    drain_between_stages: bool = False

    def __post_init__(self) -> None:
        if self.num_pods < 1:
            raise ConfigError("must be >= 1", "numPods")
        if self.event_delay_s < 0 or self.metrics_interval_s < 0 or self.idle_scrape_s <= 0:
            raise ConfigError("delays and intervals must be >= 0 (the idle scrape period > 0)")
        if self.sample_interval_s <= 0:
            raise ConfigError("must be > 0", "sampleInterval")
        if not 0.0 <= self.event_loss < 1.0:
            raise ConfigError("must be in [0, 1)", "eventLoss")

    @property
    def model_name(self) -> str:
        """The served model name."""
        return self.model or self.profile.model.name


@dataclass(slots=True)
class RequestRecord:
    """One request's life, for reports.

    Attributes:
        request_id: Id.
        stage: Load stage it arrived in.
        pod: Pod it was routed to ("" when routing failed).
        status: 200 served, 400 rejected, 503 no endpoint, 0 unfinished at the end of the run.
        arrival: Virtual arrival time.
        first_token: Virtual time of the first token (None without one).
        finish: Virtual completion time (None if unfinished).
        prompt_tokens: Prompt length.
        cached_tokens: Prefix-cache hit at its first admission.
        ideal_cached_tokens: Hit an infinite cache that saw every earlier request would give.
        output_tokens: Tokens generated.
        preemptions: Times it was preempted.
    """

    request_id: str
    stage: int
    pod: str
    status: int
    arrival: float
    first_token: float | None
    finish: float | None
    prompt_tokens: int
    cached_tokens: int
    ideal_cached_tokens: int
    output_tokens: int
    preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token."""
        return None if self.first_token is None else self.first_token - self.arrival


@dataclass
class RunResult:
    """Everything a run measured.

    Attributes:
        router: Router name.
        stages: Load stages on the timeline.
        records: One record per request.
        stage_output_tokens: Output tokens generated inside each stage's time window.
        samples: (virtual time, mean waiting, mean running, mean KV usage) over pods.
        pods: Pod ids.
        end_time: Virtual time of the last event.
        wall_time_s: Real seconds the run took.
        payloads: KV-event payloads published.
        payload_bytes: Their total size.
        payloads_lost: Payloads dropped on the way to the sinks (``event_loss``).
        sink_errors: Payloads a sink raised on (logged and skipped).
        engine_stats: Per-pod engine counters.
        profile: The pods' profile figures (`EngineProfile.describe`).
        workload: The workload's knobs (`Workload.describe`).
        drain_between_stages: Stages ran independently (each after the previous drained).
        measure_ends: End of each stage's measurement window (output and completion rates):
            its arrival window's end; with ``drain_between_stages``, the next stage's start
            (the last stage: the end of the run), so a stage's drain counts as its own.
    """

    router: str
    stages: list[StageWindow]
    records: list[RequestRecord] = field(default_factory=list)
    stage_output_tokens: list[int] = field(default_factory=list)
    samples: list[tuple[float, float, float, float]] = field(default_factory=list)
    pods: list[str] = field(default_factory=list)
    end_time: float = 0.0
    wall_time_s: float = 0.0
    payloads: int = 0
    payload_bytes: int = 0
    payloads_lost: int = 0
    sink_errors: int = 0
    engine_stats: dict[str, EngineStats] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)
    workload: dict[str, Any] = field(default_factory=dict)
    drain_between_stages: bool = False
    measure_ends: list[float] = field(default_factory=list)
