"""Topology-aware P/D placement (upstream llm-d's topology plugins): ``topology-extractor``,
``topology-affinity-filter`` and ``topology-affinity-scorer``.

Under disaggregated serving the KV cache moves from the prefill pod to the decode pod, and how
fast depends on where the two run: NVLink on one host, a NIC and one switch within a rack, more
switch hops within a zone, inter-datacenter links within a region. These plugins make the second
pick of a request prefer (filter) or favour (scorer) candidates close to the first pick, the
*peer*: the decode pick when the prefill profile runs after decode (``stageOrder: decode-first``),
the prefill pick when the decode profile runs after prefill (``prefill-first``).

Mapping onto upstream. Upstream's ``topology-extractor`` is a data-layer plugin that stamps each
endpoint with a ``Topology`` attribute (hostname, rack, zone, region) read from pod labels, and
the filter and scorer read that attribute, keyed by the extractor's name (their
``topologyProducerName``, default ``topology-extractor``). kvaware has no data layer: endpoints
carry their pod labels (endpoints file or Kubernetes discovery), so `TopologyExtractor` derives
an endpoint's `Topology` from its labels on demand (`TopologyExtractor.topology`, no state kept)
and the filter and scorer call the extractor configured under ``topologyProducerName``. The label
parameters, their defaults and the comparison rules are upstream's. Upstream falls back to the
pod's ``spec.hostname`` when the hostname label is missing; endpoints here carry no pod spec, so
there is no fallback: put the host in a label (the default ``kubernetes.io/hostname`` is not a
pod label in Kubernetes either; copy the node's value onto the pods).

The peer is read from ``request.state[PEER_ENDPOINT_KEY]`` (upstream's ``peer-endpoint`` request
attribute), which the P/D profile handler sets with `publish_peer` before it runs the second
stage; while nothing has set it, the filter keeps every candidate and the scorer gives 0.

Upstream semantics kept: levels are tightest first (host, rack, zone, region) and the common level
of two endpoints is the tightest field both have with the same non-empty value (an empty or
missing value never matches, not even another empty one; a sparse endpoint can match at a looser
level only). The filter keeps candidates at ``minAffinity`` or tighter; it keeps every candidate
when the peer or its topology is unknown and when none would pass (a preference must never make
a request unroutable); candidates without any topology label are dropped otherwise. The scorer
gives 1.0 / 0.2 / 0.05 / 0.02 / 0 for host / rack / zone / region / nothing in common, and 0 to
every candidate when the peer's topology is unknown.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Literal

from pydantic import ValidationInfo, field_validator

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler import (
    PEER_ENDPOINT_KEY,
    Endpoint,
    PluginContext,
    PluginRegistry,
    SchedulingContext,
    SchedulingRequest,
)
from kvaware_scorer.scheduler.types import SchedulerView

__all__ = [
    "DEFAULT_LABELS",
    "EXTRACTOR_TYPE",
    "LEVEL_SCORES",
    "PEER_ENDPOINT_KEY",
    "Level",
    "Topology",
    "TopologyAffinityFilter",
    "TopologyAffinityFilterParams",
    "TopologyAffinityScorer",
    "TopologyAffinityScorerParams",
    "TopologyExtractor",
    "TopologyExtractorParams",
    "common_level",
    "peer_endpoint",
    "publish_peer",
    "register",
]

logger = logging.getLogger(__name__)

EXTRACTOR_TYPE = "topology-extractor"

#: Pod labels read by default for each topology field (upstream's Kubernetes defaults).
DEFAULT_LABELS: Mapping[str, str] = {
    "hostname": "kubernetes.io/hostname",
    "rack": "topology.kubernetes.io/rack",
    "zone": "topology.kubernetes.io/zone",
    "region": "topology.kubernetes.io/region",
}


class Level(IntEnum):
    """A topology tier, tightest first: same host implies same rack, zone and region."""

    HOST = 0
    RACK = 1
    ZONE = 2
    REGION = 3
    NONE = 4


LevelName = Literal["host", "rack", "zone", "region"]
_LEVELS: Mapping[str, Level] = {
    "host": Level.HOST,
    "rack": Level.RACK,
    "zone": Level.ZONE,
    "region": Level.REGION,
}

#: Score of each common level: shaped by KV-transfer bandwidth (NVLink, one switch, several
#: hops, inter-datacenter), not evenly spaced, so co-location wins outright (upstream's curve).
LEVEL_SCORES: Mapping[Level, float] = {
    Level.HOST: 1.0,
    Level.RACK: 0.2,
    Level.ZONE: 0.05,
    Level.REGION: 0.02,
    Level.NONE: 0.0,
}


@dataclass(frozen=True, slots=True)
class Topology:
    """Where an endpoint runs; an empty field is unknown."""

    hostname: str = ""
    rack: str = ""
    zone: str = ""
    region: str = ""


def common_level(peer: Topology | None, candidate: Topology | None) -> Level:
    """The tightest level at which both have the same non-empty value (`Level.NONE` when there
    is none, or when either is None)."""
    if peer is None or candidate is None:
        return Level.NONE
    pairs = (
        (Level.HOST, peer.hostname, candidate.hostname),
        (Level.RACK, peer.rack, candidate.rack),
        (Level.ZONE, peer.zone, candidate.zone),
        (Level.REGION, peer.region, candidate.region),
    )
    for level, a, b in pairs:
        if a and a == b:
            return level
    return Level.NONE


def publish_peer(request: SchedulingRequest, endpoint: Endpoint | None) -> None:
    """Record `endpoint` as the earlier stage's pick of `request` (None clears it)."""
    if endpoint is None:
        request.state.pop(PEER_ENDPOINT_KEY, None)
    else:
        request.state[PEER_ENDPOINT_KEY] = endpoint


def peer_endpoint(request: SchedulingRequest) -> Endpoint | None:
    """The earlier stage's pick of `request`, or None (anything else stored there is ignored)."""
    value = request.state.get(PEER_ENDPOINT_KEY)
    return value if isinstance(value, Endpoint) else None


# -- topology-extractor ---------------------------------------------------------------------------


class TopologyExtractorParams(ConfigModel):
    """Parameters of ``topology-extractor``: the pod label read for each field (empty: the
    default Kubernetes topology label).

    Attributes:
        hostname: Label of the host (``kubernetes.io/hostname``).
        rack: Label of the rack or NVLink domain (``topology.kubernetes.io/rack``).
        zone: Label of the zone (``topology.kubernetes.io/zone``).
        region: Label of the region (``topology.kubernetes.io/region``).
    """

    hostname: str = DEFAULT_LABELS["hostname"]
    rack: str = DEFAULT_LABELS["rack"]
    zone: str = DEFAULT_LABELS["zone"]
    region: str = DEFAULT_LABELS["region"]

    @field_validator("hostname", "rack", "zone", "region", mode="before")
    @classmethod
    def _default_label(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or value == "":
            return DEFAULT_LABELS[info.field_name or ""]
        return value


class TopologyExtractor:
    """``topology-extractor``: an endpoint's `Topology` from its pod labels (see the module
    docstring). Keeps no state: labels are read on each call."""

    def __init__(self, params: TopologyExtractorParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.labels = (params.hostname, params.rack, params.zone, params.region)

    def topology(self, endpoint: Endpoint) -> Topology | None:
        """`endpoint`'s topology, or None when it has none of the labels (upstream then sets no
        attribute). A non-string label value counts as missing."""
        labels = endpoint.labels
        if not isinstance(labels, Mapping):
            return None
        values = []
        for key in self.labels:
            value = labels.get(key)
            values.append(value if isinstance(value, str) else "")
        if not any(values):
            return None
        return Topology(*values)


# -- the consumers --------------------------------------------------------------------------------


class TopologyAffinityScorerParams(ConfigModel):
    """Parameters of ``topology-affinity-scorer``.

    Attributes:
        topology_producer_name: The ``topology-extractor`` plugin to read topology from; empty:
            the one named ``topology-extractor`` (upstream's default producer).
    """

    topology_producer_name: str = ""

    @field_validator("topology_producer_name", mode="before")
    @classmethod
    def _unset_name(cls, value: Any) -> Any:
        return "" if value is None else value


class TopologyAffinityFilterParams(TopologyAffinityScorerParams):
    """Parameters of ``topology-affinity-filter``.

    Attributes:
        min_affinity: Loosest common level a candidate may share with the peer and pass:
            ``host`` (default), ``rack``, ``zone`` or ``region``.
    """

    min_affinity: LevelName = "host"

    @field_validator("min_affinity", mode="before")
    @classmethod
    def _level(cls, value: Any) -> Any:
        if value is None or value == "":
            return "host"
        if not isinstance(value, str) or value not in _LEVELS:
            shown = json.dumps(value[:64]) if isinstance(value, str) else type(value).__name__
            raise ValueError(
                f"invalid topology level {shown}, must be one of host, rack, zone, region"
            )
        return value


class _TopologyConsumer:
    """Shared by the filter and the scorer: finds the extractor and the peer's topology."""

    def __init__(self, params: TopologyAffinityScorerParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.producer_name = params.topology_producer_name or EXTRACTOR_TYPE
        self._scheduler = ctx.scheduler
        self._extractor: TopologyExtractor | None = None
        self._resolved = False
        if ctx.scheduler is not None:
            self._check_producer(ctx.scheduler, explicit=bool(params.topology_producer_name))

    def _check_producer(self, scheduler: SchedulerView, *, explicit: bool) -> None:
        target = scheduler.config.plugins.get(self.producer_name)
        if target is not None and target.type == EXTRACTOR_TYPE:
            return
        if explicit:
            kind = "no plugin" if target is None else f"a {target.type}"
            raise ConfigError(
                f"{self.producer_name!r} is {kind}, not a {EXTRACTOR_TYPE}",
                "topologyProducerName",
            )
        # NOTE: upstream declares the attribute optional: a startup warning, then no topology.
        logger.warning(
            "%s: no %s named %r is configured; candidates are not compared by topology",
            self.name,
            EXTRACTOR_TYPE,
            self.producer_name,
        )

    def extractor(self, ctx: SchedulingContext) -> TopologyExtractor | None:
        """The configured extractor (looked up once the scheduler is known)."""
        if not self._resolved:
            sched = ctx.scheduler or self._scheduler
            if sched is None:
                return None
            obj = sched.plugins.get(self.producer_name)
            self._extractor = obj if isinstance(obj, TopologyExtractor) else None
            self._resolved = True
        return self._extractor

    def peer(
        self, ctx: SchedulingContext, request: SchedulingRequest
    ) -> tuple[TopologyExtractor, Topology] | None:
        """The extractor and the peer's topology, or None when either is unknown."""
        extractor = self.extractor(ctx)
        peer = peer_endpoint(request)
        if extractor is None or peer is None:
            return None
        topology = extractor.topology(peer)
        return (extractor, topology) if topology is not None else None


class TopologyAffinityFilter(_TopologyConsumer):
    """``topology-affinity-filter``: keeps the candidates sharing ``minAffinity`` or a tighter
    level with the peer; every candidate when the peer's topology is unknown or none would pass."""

    def __init__(self, params: TopologyAffinityFilterParams, ctx: PluginContext) -> None:
        super().__init__(params, ctx)
        self.min_affinity = _LEVELS[params.min_affinity]

    def filter(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        found = self.peer(ctx, request)
        if found is None:
            return endpoints
        extractor, peer = found
        floor = self.min_affinity
        kept = []
        for e in endpoints:
            topology = extractor.topology(e)
            if topology is not None and common_level(peer, topology) <= floor:
                kept.append(e)
        return kept or endpoints


class TopologyAffinityScorer(_TopologyConsumer):
    """``topology-affinity-scorer``: `LEVEL_SCORES` of the level each candidate shares with the
    peer; 0 everywhere when the peer's topology is unknown."""

    def score(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Mapping[str, float]:
        out = dict.fromkeys((e.id for e in endpoints), 0.0)
        found = self.peer(ctx, request)
        if found is None:
            return out
        extractor, peer = found
        for e in endpoints:
            out[e.id] = LEVEL_SCORES[common_level(peer, extractor.topology(e))]
        return out


def register(registry: PluginRegistry) -> None:
    """Register the topology extractor, filter and scorer."""
    registry.register(
        EXTRACTOR_TYPE,
        TopologyExtractor,
        params=TopologyExtractorParams,
        kinds=("topology-extractor",),
        description="endpoint topology (host, rack, zone, region) from pod labels",
    )
    registry.register(
        "topology-affinity-filter",
        TopologyAffinityFilter,
        params=TopologyAffinityFilterParams,
        kinds=("filter",),
        description="candidates co-located with the other P/D stage's pick (minAffinity)",
        refs={"topologyProducerName": EXTRACTOR_TYPE},
    )
    registry.register(
        "topology-affinity-scorer",
        TopologyAffinityScorer,
        params=TopologyAffinityScorerParams,
        kinds=("scorer",),
        description="favours candidates close to the other P/D stage's pick",
        refs={"topologyProducerName": EXTRACTOR_TYPE},
    )
