"""Upstream plugin types that this host provides natively, accepted so that real upstream
EndpointPickerConfig files load: they are validated loosely and do nothing (a warning says so).

* ``metrics-data-source``, ``core-metrics-extractor``: metrics come from the endpoints' own
  ``/metrics`` (`kvaware_scorer.scheduler.MetricsScraper`).
* ``endpoint-notification-source``: endpoints come from the endpoints file (``file-discovery``
  is a real plugin: `kvaware_scorer.plugins.discovery`).
* ``token-producer`` (formerly ``tokenizer``): scorers tokenize themselves (once per request,
  shared).
* ``inflight-load-producer``: ``active-request-scorer`` counts in-flight requests itself.
* ``openai-parser``, ``vllmhttp-parser``, ``passthrough-parser``: request parsing is the
  gateway's.
* ``vllmgrpc-parser``, ``vertexai-parser``: gRPC front doors (Envoy ext_proc over gRPC bodies);
  there is none here, so they cannot parse anything.
* ``models-data-source``, ``models-data-extractor``: the gateway's model catalog polls each
  pod's ``/v1/models``.

It also declares upstream's default prefix match-info producer (`DEFAULT_PRODUCER`): the
plugin a consumer without ``prefixMatchInfoProducerName`` reads when it is configured.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from pydantic import BaseModel, ConfigDict

from kvaware_scorer.scheduler import PluginContext, PluginRegistry

__all__ = ["DEFAULT_PRODUCER", "INERT_TYPES", "InertParams", "InertPlugin", "register"]

#: Name of the producer a consumer without ``prefixMatchInfoProducerName`` reads, when
#: configured (upstream's auto-created default producer, an ``approx-prefix-cache-producer``).
DEFAULT_PRODUCER = "approx-prefix-cache-producer"

INERT_TYPES: Mapping[str, str] = MappingProxyType(
    {
        "metrics-data-source": "pod metrics are scraped by the scheduler itself",
        "core-metrics-extractor": "vLLM metric names are built in",
        "endpoint-notification-source": "endpoints come from the endpoints file",
        "token-producer": "scorers tokenize requests themselves",
        "inflight-load-producer": "active-request-scorer counts in-flight requests itself",
        "openai-parser": "request parsing is done by the gateway",
        "vllmgrpc-parser": "there is no gRPC front door here: vLLM gRPC requests are not parsed",
        "vertexai-parser": "there is no gRPC front door here: Vertex AI requests are not parsed",
        "models-data-source": "the gateway's model catalog reads each pod's /v1/models itself",
        "models-data-extractor": "the gateway's model catalog reads each pod's /v1/models itself",
        "vllmhttp-parser": "request parsing is done by the gateway",
        "passthrough-parser": "request parsing is done by the gateway",
    }
)


class InertParams(BaseModel):
    """Any parameters (they are not used)."""

    model_config = ConfigDict(extra="allow")


class InertPlugin:
    """Does nothing; stands for an upstream plugin whose job this host does natively."""

    def __init__(self, params: InertParams, ctx: PluginContext) -> None:
        self.name = ctx.name


def register(registry: PluginRegistry) -> None:
    """Register the inert upstream types, the ``tokenizer`` alias and upstream's default
    match-info producer."""
    for type_name, why in INERT_TYPES.items():
        registry.register(
            type_name,
            InertPlugin,
            params=InertParams,
            kinds=(),
            description=f"accepted for upstream configs; no-op ({why})",
            inert=True,
        )
    registry.register_alias("tokenizer", "token-producer")
    registry.set_default_producer(DEFAULT_PRODUCER)
