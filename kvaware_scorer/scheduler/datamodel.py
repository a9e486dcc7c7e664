"""The scheduler's data model: endpoints, requests, results, as plain dataclasses.

These are a contract shared with the gateway, the EPP and the emulator: fields are only ever
added, never renamed. `kvaware_scorer.scheduler.types` re-exports every name here (and declares
the plugin role Protocols that take these records); this module imports nothing of the
scheduler package.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DATA_PARALLEL_HEADER",
    "ENCODER_HEADER",
    "ENGINE_LABELS",
    "PEER_ENDPOINT_KEY",
    "PREFILL_HEADER",
    "ROUTING_HEADERS",
    "Endpoint",
    "EndpointMetrics",
    "ProfileResult",
    "ProfileView",
    "ResponseInfo",
    "SchedulingRequest",
    "SchedulingResult",
    "ScoredEndpoint",
    "engine_of",
]

#: Pod labels naming the serving engine, as upstream reads them (newest first).
ENGINE_LABELS = ("llm-d.ai/engine-type", "inference.networking.k8s.io/engine-type")


#: Header naming the prefill pod (``ip:port``) for the decode pod's sidecar (llm-d P/D).
PREFILL_HEADER = "x-prefiller-host-port"
#: Header naming the encode pods (comma-separated ``ip:port``) (llm-d E/P/D).
ENCODER_HEADER = "x-encoder-hosts-ports"
#: Header naming the decode target when ``pd-profile-handler``'s ``primaryPort`` is set.
DATA_PARALLEL_HEADER = "x-data-parallel-host-port"
#: `SchedulingRequest.state` key of the endpoint the earlier stage of a disaggregated request
#: picked (upstream's ``peer-endpoint`` request attribute): the P/D profile handler sets it
#: before the later stage runs, topology-aware plugins read it.
PEER_ENDPOINT_KEY = "peer-endpoint"
#: Routing headers only the scheduler sets (`SchedulingResult.headers`); a client's own values
#: are never passed on, or a client could point a sidecar at any host.
ROUTING_HEADERS = frozenset({PREFILL_HEADER, ENCODER_HEADER, DATA_PARALLEL_HEADER})


@dataclass(slots=True)
class EndpointMetrics:
    """What scorers read about a pod's load; vLLM metric names in parentheses.

    Attributes:
        waiting_queue_size: Requests waiting (``vllm:num_requests_waiting``).
        running_requests_size: Requests running (``vllm:num_requests_running``).
        kv_cache_usage_percent: KV-cache usage as a fraction 0..1 (``vllm:kv_cache_usage_perc``).
        cache_block_size: Tokens per KV block (``vllm:cache_config_info{block_size}``).
        cache_num_blocks: GPU KV blocks (``vllm:cache_config_info{num_gpu_blocks}``).
        update_time: Scheduler-clock time of the last successful scrape or update; 0 = never.
        active_models: LoRA adapters running (``vllm:lora_requests_info{running_lora_adapters}``).
        waiting_models: LoRA adapters waiting (``…{waiting_lora_adapters}``).
        max_active_models: Adapters the pod can hold at once (``…{max_lora}``); 0 = unknown.
        attributes: Further scalar endpoint attributes by name (read by
            ``endpoint-attribute-filter`` / ``-scorer``), set by an in-process driver.
    """

    waiting_queue_size: int = 0
    running_requests_size: int = 0
    kv_cache_usage_percent: float = 0.0
    cache_block_size: int | None = None
    cache_num_blocks: int | None = None
    update_time: float = 0.0
    active_models: frozenset[str] = frozenset()
    waiting_models: frozenset[str] = frozenset()
    max_active_models: int = 0
    attributes: dict[str, float] = field(default_factory=dict)


@dataclass(eq=False)
class Endpoint:
    """One serving endpoint (a vLLM pod, or one data-parallel rank of it).

    Attributes:
        name: Display name.
        address: IP address or host name.
        port: Serving port.
        labels: Pod labels (e.g. ``llm-d.ai/role``).
        metrics: Latest load metrics (scraped, or written by an in-process driver).
        kv_events: The pod's ZMQ publisher endpoint (connect mode), optional.
        kv_events_replay: Its replay ROUTER endpoint, optional.
        model: Served model, optional.
        namespace: Kubernetes namespace, optional (informational).
        metrics_path: HTTP path of the pod's Prometheus metrics.
        metrics_port: Port of the metrics endpoint (None = the serving port).
        engine: The serving engine (``vllm``, ``sglang``): the wire format of its KV events
            and the names of its metrics. None: read from the pod label
            ``llm-d.ai/engine-type`` (as upstream), else the scorer's ``engineType``.
        pod: The Kubernetes pod serving the endpoint, when known (a pod's data-parallel ranks
            are several endpoints of one pod; per-pod data such as GPU metrics name it).
        node_address: The address of the node running the pod, when known (node-level
            exporters, e.g. a DCGM exporter DaemonSet).
    """

    name: str
    address: str
    port: int
    labels: dict[str, str] = field(default_factory=dict)
    metrics: EndpointMetrics = field(default_factory=EndpointMetrics)
    kv_events: str | None = None
    kv_events_replay: str | None = None
    model: str | None = None
    namespace: str | None = None
    metrics_path: str = "/metrics"
    metrics_port: int | None = None
    engine: str | None = None
    pod: str | None = None
    node_address: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_id", f"{self.address}:{self.port}")

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in ("address", "port") and "_id" in self.__dict__:
            object.__setattr__(self, "_id", f"{self.address}:{self.port}")

    @property
    def id(self) -> str:
        """Pod id used by the index and by KV events: ``"<address>:<port>"``."""
        # NOTE: cached (read many times per scheduling call); kept in sync by __setattr__.
        pid: str = self.__dict__["_id"]
        return pid

    def __repr__(self) -> str:
        return f"Endpoint({self.name!r}, {self.id})"


@dataclass
class SchedulingRequest:
    """One inference request as the scheduler sees it.

    Give the prompt as `token_ids` (used as they are), `prompt` (completion text) or `messages`
    (chat). Plugins that need tokens call `tokens`, so a request is tokenized at most once even
    when several plugins need its tokens.

    Attributes:
        request_id: Unique id (in-flight accounting keys on it).
        model: Requested model name.
        token_ids: Prompt token ids.
        prompt: Completion prompt text.
        messages: Chat messages.
        lora_name: LoRA adapter name.
        cache_salt: vLLM ``cache_salt``.
        headers: Request headers.
        chat: Chat rendering options (``chat_template``, ``chat_template_kwargs``, ``tools``...).
        state: Per-request scratch space shared by plugins between scheduling and the response
            (keyed by plugin name by convention).
        priority: Upstream's objective priority: < 0 is sheddable (admission may turn it away),
            higher is served first by flow control.
        streaming: Whether the answer's first token will be reported
            (`Scheduler.first_token`): True for an SSE answer the gateway or the Endpoint
            Picker relays as it comes; False for a whole-body answer (no first token is ever
            seen, so in-flight accounting estimates when its prefill ended); None when the
            caller does not say (treated as True).
    """

    request_id: str
    model: str
    token_ids: list[int] | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    lora_name: str | None = None
    cache_salt: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    chat: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict, repr=False)
    priority: int = 0
    streaming: bool | None = None
    _tokens: list[int] | None = field(default=None, init=False, repr=False)
    _tokens_lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def tokens(self, tokenize: Callable[[], list[int]]) -> list[int]:
        """The prompt's token ids: `token_ids` if given, else ``tokenize()`` (called once).

        Args:
            tokenize: Computes token ids from `prompt` / `messages`; its result is cached on
                the request for every later caller. Its exceptions propagate (and nothing is
                cached).
        """
        if self.token_ids is not None:
            return self.token_ids
        if self._tokens is None:
            with self._tokens_lock:
                if self._tokens is None:
                    self._tokens = list(tokenize())
        return self._tokens

    @property
    def has_tokens(self) -> bool:
        """Whether token ids are known without tokenizing."""
        return self.token_ids is not None or self._tokens is not None


@dataclass(slots=True)
class ScoredEndpoint:
    """An endpoint and its weighted total, as handed to a picker."""

    endpoint: Endpoint
    score: float


@dataclass
class ProfileResult:
    """What one scheduling profile produced.

    Attributes:
        profile: Profile name.
        targets: Chosen endpoint(s), best first.
        candidates: Endpoint ids left after the filters.
        scores: Scorer plugin name -> endpoint id -> clamped score (0 where it gave none).
        weights: Scorer plugin name -> weight.
        totals: Endpoint id -> sum over scorers of weight x score.
    """

    profile: str
    targets: list[Endpoint]
    candidates: list[str]
    scores: dict[str, dict[str, float]]
    weights: dict[str, float]
    totals: dict[str, float]


@dataclass
class SchedulingResult:
    """The scheduler's decision for a request, with the numbers that explain it.

    Attributes:
        targets: Chosen endpoint(s) of the primary profile, best first.
        profile: The primary profile's name.
        candidates: Endpoint ids left after the primary profile's filters.
        scores: Scorer plugin name -> endpoint id -> clamped score.
        weights: Scorer plugin name -> weight.
        totals: Endpoint id -> sum(weight x score).
        profile_results: Every profile that ran, by name.
        errors: Scorer plugin name -> the error it raised (it then scored 0 everywhere).
        dry_run: Whether this was an explanation only (no pre-request hook ran).
        headers: Request headers the pre-request hooks want sent to the primary target, e.g.
            ``x-prefiller-host-port: <ip:port>`` of the prefill pick for the decode pod's
            sidecar under P/D (as upstream sets them); the gateway and the EPP send them.
        failed_profiles: Profiles that ran and found no endpoint -> why (a multi-profile
            handler may go on without them, as upstream drops a failed profile's result).
        response_headers: Headers the pre-request hooks want sent back to the client (e.g.
            ``session-affinity-scorer``'s session token); the gateway adds them.
    """

    targets: list[Endpoint]
    profile: str
    candidates: list[str]
    scores: dict[str, dict[str, float]]
    weights: dict[str, float]
    totals: dict[str, float]
    profile_results: dict[str, ProfileResult] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    failed_profiles: dict[str, str] = field(default_factory=dict)
    response_headers: dict[str, str] = field(default_factory=dict)

    @property
    def target(self) -> Endpoint:
        """The first chosen endpoint."""
        return self.targets[0]

    def profile_target(self, profile: str) -> Endpoint | None:
        """The first pick of `profile` (e.g. ``prefill`` under P/D), None when it did not run
        or found no endpoint."""
        pr = self.profile_results.get(profile)
        return pr.targets[0] if pr is not None and pr.targets else None

    def pick_of(self, profile: str | None) -> Endpoint | None:
        """`profile_target` of `profile`, or the primary pick when `profile` is empty (a
        plugin's ``profileName`` parameter)."""
        if profile:
            return self.profile_target(profile)
        return self.targets[0] if self.targets else None


@dataclass
class ResponseInfo:
    """How a scheduled request ended (given to post-response hooks).

    Attributes:
        status: HTTP status (or 0 when the connection failed).
        prompt_tokens: Prompt tokens reported by the server.
        cached_tokens: Prompt tokens served from the prefix cache, when reported.
        completion_tokens: Generated tokens.
        error: Error text when the request failed.
        total_tokens: The total the server reported, when it did.
        dynamic_metadata: What post-response hooks want the proxy told (``ext_proc`` dynamic
            metadata: namespace -> key -> value, e.g. ``request-attribute-reporter``'s cost);
            the Endpoint Picker sends it with its answer to the response's end.
    """

    status: int = 200
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    completion_tokens: int = 0
    error: str | None = None
    total_tokens: int | None = None
    dynamic_metadata: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class ProfileView:
    """A configured scheduling profile as a profile handler sees it."""

    name: str
    filters: tuple[str, ...]
    scorers: tuple[tuple[str, float], ...]
    picker: str


def engine_of(endpoint: Endpoint) -> str | None:
    """`endpoint`'s serving engine: its ``engine``, else its engine-type label, else None."""
    if endpoint.engine:
        return endpoint.engine
    for label in ENGINE_LABELS:
        value = endpoint.labels.get(label)
        if value:
            return value.strip().lower()
    return None
