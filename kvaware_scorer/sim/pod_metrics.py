"""A live pod's ``GET /metrics``: its engine state under vLLM's Prometheus names and labels.

`PodCollector` reads the pod's engine at scrape time. The families are two tables of
``(name, help, value getter)``: vLLM's own metrics (gauges, then counters), then the emulator's
``kvaware_sim_`` counters, with ``vllm:cache_config_info`` between them, in the order vLLM's
``PrometheusStatLogger`` exposes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from kvaware_scorer.sim.engine import Engine
    from kvaware_scorer.sim.live_pod import LivePod

__all__ = ["PodCollector"]

#: Reads one value off a running pod and its engine.
_Getter = Callable[["LivePod", "Engine"], float]

#: vLLM's metrics: (counter?, name, help, value). A counter's sample gets ``_total``.
_VLLM_FAMILIES: tuple[tuple[bool, str, str, _Getter], ...] = (
    (
        False,
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        lambda pod, engine: engine.num_running,
    ),
    (
        False,
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        lambda pod, engine: engine.num_waiting,
    ),
    (
        False,
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        lambda pod, engine: engine.kv_usage(),
    ),
    (
        True,
        "vllm:prefix_cache_queries",
        "Prefix cache queries, in terms of number of queried tokens.",
        lambda pod, engine: engine.stats.prefix_queries,
    ),
    (
        True,
        "vllm:prefix_cache_hits",
        "Prefix cache hits, in terms of number of cached tokens.",
        lambda pod, engine: engine.stats.prefix_hits,
    ),
    (
        True,
        "vllm:num_preemptions",
        "Cumulative number of preemption from the engine.",
        lambda pod, engine: engine.stats.preemptions,
    ),
    (
        True,
        "vllm:prompt_tokens",
        "Number of prefill tokens processed.",
        lambda pod, engine: engine.stats.prompt_tokens,
    ),
    (
        True,
        "vllm:prompt_tokens_cached",
        "Number of cached prompt tokens (local + external).",
        lambda pod, engine: engine.stats.prompt_tokens_cached,
    ),
    (
        True,
        "vllm:generation_tokens",
        "Number of generation tokens processed.",
        lambda pod, engine: engine.stats.generated_tokens,
    ),
)

#: The emulator's own counters (name, help, value), after vLLM's families.
_SIM_COUNTERS: tuple[tuple[str, str, _Getter], ...] = (
    (
        "kvaware_sim_kv_event_batches",
        "KV-event batches this emulated pod published.",
        lambda pod, engine: pod.batches_published,
    ),
    (
        "kvaware_sim_kv_event_bytes",
        "Bytes of KV-event payloads this emulated pod published.",
        lambda pod, engine: pod.bytes_published,
    ),
    (
        "kvaware_sim_requests_aborted",
        "Requests aborted (client gone) on this emulated pod.",
        lambda pod, engine: pod.requests_aborted,
    ),
)

#: Label names of ``vllm:cache_config_info`` (the cache config's fields, then ``engine``).
_CACHE_INFO_LABELS = [
    "block_size",
    "cache_dtype",
    "enable_prefix_caching",
    "gpu_memory_utilization",
    "num_cpu_blocks",
    "num_gpu_blocks",
    "prefix_caching_hash_algo",
    "engine",
]


class PodCollector:
    """Prometheus collector of one pod's engine state under vLLM's metric names and labels.

    Every family carries ``model_name`` and ``engine`` (``"0"``) like vLLM's
    ``PrometheusStatLogger``, except ``vllm:cache_config_info``, which vLLM labels with the
    cache config's fields and ``engine`` only.
    """

    def __init__(self, pod: LivePod) -> None:
        self.pod = pod

    def collect(self) -> Iterator[Metric]:
        """The metric families of the pod's current engine (counters restart with the pod)."""
        pod = self.pod
        engine = pod.engine
        if engine is None:
            return
        for is_counter, name, doc, value in _VLLM_FAMILIES:
            yield self._family(is_counter, name, doc, value(pod, engine))
        yield self._cache_config_info(engine)
        for name, doc, value in _SIM_COUNTERS:
            yield self._family(True, name, doc, value(pod, engine))

    def _family(self, is_counter: bool, name: str, doc: str, value: float) -> Metric:
        kind = CounterMetricFamily if is_counter else GaugeMetricFamily
        family = kind(name, doc, labels=["model_name", "engine"])
        family.add_metric([self.pod.model, "0"], value)
        return family

    def _cache_config_info(self, engine: Engine) -> Metric:
        pod = self.pod
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=_CACHE_INFO_LABELS,
        )
        algo = "sha256" if pod.config.engine_hash == "sha256" else "kvaware-xxh3"
        info.add_metric(
            [
                str(engine.block_size),
                "auto",
                "True",
                str(pod.profile.gpu_memory_utilization),
                "None",
                str(engine.pool.num_gpu_blocks),
                algo,
                "0",
            ],
            1.0,
        )
        return info
