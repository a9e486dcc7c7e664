"""Topology-aware P/D placement: ``topology-extractor``, ``topology-affinity-filter`` and
``topology-affinity-scorer`` (ported in spirit from upstream's level, filter, scorer and extractor
test tables, plus the P/D path through the profile handler)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.plugins.topology import (
    LEVEL_SCORES,
    PEER_ENDPOINT_KEY,
    Level,
    Topology,
    TopologyExtractor,
    common_level,
    peer_endpoint,
    publish_peer,
)
from kvaware_scorer.scheduler import (
    Endpoint,
    PluginRegistry,
    Scheduler,
    SchedulingRequest,
    load_config,
)

from .conftest import build, config

ROLE = "llm-d.ai/role"
HOST = "kubernetes.io/hostname"
RACK = "topology.kubernetes.io/rack"
ZONE = "topology.kubernetes.io/zone"
REGION = "topology.kubernetes.io/region"
CORPUS = Path(__file__).parent / "upstream_corpus" / "pd-topology.yaml"


def ep(name: str, i: int, role: str = "prefill", **where: str) -> Endpoint:
    """An endpoint whose topology labels are ``host``, ``rack``, ``zone``, ``region`` (if given)."""
    keys = {"host": HOST, "rack": RACK, "zone": ZONE, "region": REGION}
    labels = {ROLE: role, **{keys[k]: v for k, v in where.items()}}
    return Endpoint(name, f"10.2.0.{i}", 8000, labels)


PEER = ep("peer", 0, "decode", host="h1", rack="r1", zone="z1", region="g1")


def candidates() -> list[Endpoint]:
    """One candidate per common level with `PEER`, and one without any topology label."""
    return [
        ep("same-host", 1, host="h1", rack="r1", zone="z1", region="g1"),
        ep("same-rack", 2, host="h2", rack="r1", zone="z1", region="g1"),
        ep("same-zone", 3, host="h3", rack="r2", zone="z1", region="g1"),
        ep("same-region", 4, host="h4", rack="r3", zone="z2", region="g1"),
        ep("far", 5, host="h5", rack="r4", zone="z3", region="g2"),
        ep("bare", 6),
    ]


def names(eps: Sequence[Endpoint]) -> list[str]:
    return [e.name for e in eps]


def standalone(*plugins: dict[str, Any]) -> Scheduler:
    """A scheduler holding an extractor and `plugins` (plus a scorer and a picker)."""
    return build(
        config([{"type": "topology-extractor"}, {"type": "queue-scorer"}, *plugins]), seed=0
    )


def req(peer: Endpoint | None = PEER) -> SchedulingRequest:
    r = SchedulingRequest("r", "m", token_ids=list(range(64)))
    publish_peer(r, peer)
    return r


def run_filter(s: Scheduler, name: str, r: SchedulingRequest, eps: Sequence[Endpoint]) -> list[str]:
    return names(s.plugin(name).filter(s.context(), r, eps))


def run_scorer(
    s: Scheduler, name: str, r: SchedulingRequest, eps: Sequence[Endpoint]
) -> dict[str, float]:
    by_id = {e.id: e.name for e in eps}
    return {by_id[i]: v for i, v in s.plugin(name).score(s.context(), r, eps).items()}


# -- the comparison ---------------------------------------------------------------------------


FULL = Topology("h1", "r1", "z1", "g1")


@pytest.mark.parametrize(
    ("peer", "candidate", "level"),
    [
        (FULL, FULL, Level.HOST),
        (FULL, Topology("h2", "r1", "z1", "g1"), Level.RACK),
        (FULL, Topology("h2", "r2", "z1", "g1"), Level.ZONE),
        (FULL, Topology("h2", "r2", "z2", "g1"), Level.REGION),
        (FULL, Topology("h2", "r2", "z2", "g2"), Level.NONE),
        (Topology(), Topology(), Level.NONE),
        (Topology(zone="z1"), Topology(zone="z1"), Level.ZONE),
        (FULL, Topology(rack="r1", zone="z1", region="g1"), Level.RACK),
        (FULL, Topology(zone="z1"), Level.ZONE),
        (Topology(hostname="h1"), Topology(rack="r1"), Level.NONE),
        (None, FULL, Level.NONE),
        (FULL, None, Level.NONE),
    ],
)  # fmt: skip
def test_common_level_is_the_tightest_shared_non_empty_value(
    peer: Topology | None, candidate: Topology | None, level: Level
) -> None:
    """The tightest field both have with the same value; empty never matches, not even empty."""
    assert common_level(peer, candidate) is level


# -- the extractor --------------------------------------------------------------------------------


def test_extractor_reads_the_kubernetes_labels_by_default() -> None:
    s = standalone()
    ext = s.plugin("topology-extractor")
    assert isinstance(ext, TopologyExtractor)
    assert ext.labels == (HOST, RACK, ZONE, REGION)
    assert ext.topology(PEER) == FULL
    assert ext.topology(ep("rack-only", 1, rack="r9")) == Topology(rack="r9")
    assert ext.topology(ep("bare", 2)) is None  # upstream stamps no attribute


def test_extractor_label_names_are_configurable_and_empty_means_default() -> None:
    s = build(
        config(
            [
                {
                    "type": "topology-extractor",
                    "parameters": {"hostname": "", "rack": "nvidia.com/gpu.clique", "zone": None},
                },
                {"type": "queue-scorer"},
            ]
        )
    )
    ext = s.plugin("topology-extractor")
    assert ext.labels == (HOST, "nvidia.com/gpu.clique", ZONE, REGION)
    e = Endpoint("p", "10.0.0.1", 8000, {"nvidia.com/gpu.clique": "nvl72-a", RACK: "ignored"})
    assert ext.topology(e) == Topology(rack="nvl72-a")


def test_extractor_treats_hostile_label_values_as_plain_strings() -> None:
    """Huge, odd or non-string values: compared byte for byte, non-strings count as missing."""
    ext = standalone().plugin("topology-extractor")
    huge = "h" * 100_000
    e = Endpoint("p", "10.0.0.1", 8000, {HOST: huge, RACK: 7, ZONE: " ", REGION: "ré\x00gion"})  # type: ignore[dict-item]
    topo = ext.topology(e)
    assert topo == Topology(huge, "", " ", "ré\x00gion")
    assert common_level(topo, Topology(huge + "x", "", " ")) is Level.ZONE
    weird = Endpoint("q", "10.0.0.2", 8000, {HOST: None, RACK: ["r1"]})  # type: ignore[dict-item]
    assert ext.topology(weird) is None


def test_peer_is_only_an_endpoint_put_there_by_the_handler() -> None:
    r = req(None)
    assert peer_endpoint(r) is None
    r.state[PEER_ENDPOINT_KEY] = "10.2.0.0:8000"  # not an endpoint: ignored
    assert peer_endpoint(r) is None
    publish_peer(r, PEER)
    assert peer_endpoint(r) is PEER
    publish_peer(r, None)
    assert PEER_ENDPOINT_KEY not in r.state


# -- the filter -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("min_affinity", "kept"),
    [
        (None, ["same-host"]),
        ("host", ["same-host"]),
        ("rack", ["same-host", "same-rack"]),
        ("zone", ["same-host", "same-rack", "same-zone"]),
        ("region", ["same-host", "same-rack", "same-zone", "same-region"]),
    ],
)
def test_filter_keeps_the_peer_domain_at_min_affinity(
    min_affinity: str | None, kept: list[str]
) -> None:
    """Candidates sharing minAffinity or a tighter level with the peer pass, in order; those
    without topology and those farther away do not (default minAffinity: host)."""
    params = {} if min_affinity is None else {"minAffinity": min_affinity}
    s = standalone({"type": "topology-affinity-filter", "parameters": params})
    assert run_filter(s, "topology-affinity-filter", req(), candidates()) == kept


def test_filter_sparse_candidate_matches_at_its_populated_level() -> None:
    s = standalone(
        {"type": "topology-affinity-filter", "name": "rack", "parameters": {"minAffinity": "rack"}},
        {"type": "topology-affinity-filter", "name": "host"},
    )
    rack_only = [ep("rack-only", 1, rack="r1"), ep("other", 2, host="h9", rack="r9")]
    assert run_filter(s, "rack", req(), rack_only) == ["rack-only"]
    # host floor: nobody meets it, so every candidate passes (fail open)
    assert run_filter(s, "host", req(), rack_only) == ["rack-only", "other"]


@pytest.mark.parametrize(
    "case", ["no peer", "peer without topology", "none close enough", "no extractor"]
)
def test_filter_fails_open(case: str) -> None:
    """Unknown peer topology, or no candidate meeting minAffinity: every candidate passes."""
    eps = [c for c in candidates() if c.name in ("far", "bare")]
    peer: Endpoint | None = PEER
    if case == "no peer":
        peer = None
    elif case == "peer without topology":
        peer = ep("peer", 0, "decode")
    plugins = [{"type": "queue-scorer"}, {"type": "topology-affinity-filter"}]
    if case != "no extractor":
        plugins.insert(0, {"type": "topology-extractor"})
    s = build(config(plugins), seed=0)
    assert run_filter(s, "topology-affinity-filter", req(peer), eps) == ["far", "bare"]


def test_filter_reads_the_named_extractor() -> None:
    """topologyProducerName picks the extractor (and so the labels) compared; without it the one
    named topology-extractor is read, as upstream's default producer."""
    s = standalone(
        {"type": "topology-extractor", "name": "clique", "parameters": {"rack": "clique"}},
        {
            "type": "topology-affinity-filter",
            "name": "by-clique",
            "parameters": {"minAffinity": "rack", "topologyProducerName": "clique"},
        },
        {
            "type": "topology-affinity-filter",
            "name": "by-rack",
            "parameters": {"minAffinity": "rack"},
        },
    )
    peer = Endpoint("peer", "10.2.0.0", 8000, {RACK: "r1", "clique": "c1"})
    eps = [
        Endpoint("rack", "10.2.0.1", 8000, {RACK: "r1", "clique": "c2"}),
        Endpoint("clique", "10.2.0.2", 8000, {RACK: "r2", "clique": "c1"}),
    ]
    assert run_filter(s, "by-clique", req(peer), eps) == ["clique"]
    assert run_filter(s, "by-rack", req(peer), eps) == ["rack"]


# -- the scorer ---------------------------------------------------------------------------------------


def test_scorer_follows_the_bandwidth_curve() -> None:
    s = standalone({"type": "topology-affinity-scorer"})
    got = run_scorer(s, "topology-affinity-scorer", req(), candidates())
    assert got == {
        "same-host": 1.0,
        "same-rack": 0.2,
        "same-zone": 0.05,
        "same-region": 0.02,
        "far": 0.0,
        "bare": 0.0,
    }
    assert LEVEL_SCORES[Level.HOST] == 5 * LEVEL_SCORES[Level.RACK] == 20 * LEVEL_SCORES[Level.ZONE]
    sparse = [ep("rack-only", 1, rack="r1")]
    assert run_scorer(s, "topology-affinity-scorer", req(), sparse) == {"rack-only": 0.2}


def test_scorer_scores_zero_without_peer_topology() -> None:
    s = standalone({"type": "topology-affinity-scorer"})
    for peer in (None, ep("peer", 0, "decode")):
        got = run_scorer(s, "topology-affinity-scorer", req(peer), candidates())
        assert set(got.values()) == {0.0} and len(got) == 6


# -- parameters -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plugin", "where", "message"),
    [
        (
            {"type": "topology-affinity-filter", "parameters": {"minAffinity": "datacenter"}},
            "plugins[2].parameters.minAffinity",
            'invalid topology level "datacenter", must be one of host, rack, zone, region',
        ),
        (
            {"type": "topology-affinity-filter", "parameters": {"minAffinity": "Host"}},
            "plugins[2].parameters.minAffinity",
            'invalid topology level "Host"',
        ),
        (
            {"type": "topology-affinity-filter", "parameters": {"minAffinity": 1}},
            "plugins[2].parameters.minAffinity",
            "invalid topology level int",
        ),
        (
            {"type": "topology-affinity-scorer", "parameters": {"minAffinity": "host"}},
            "plugins[2].parameters.minAffinity",
            "unknown key",
        ),
        (
            {"type": "topology-extractor", "name": "x", "parameters": {"node": "n"}},
            "plugins[2].parameters.node",
            "unknown key",
        ),
        (
            {"type": "topology-affinity-scorer", "parameters": {"topologyProducerName": "nope"}},
            "plugins[2].parameters.topologyProducerName",
            "names no plugin",
        ),
        (
            {"type": "topology-affinity-filter", "parameters": {"topologyProducerName": "queue-scorer"}},
            "plugins[2].parameters.topologyProducerName",
            "is no topology-extractor",
        ),
    ],
)  # fmt: skip
def test_parameter_errors_name_their_yaml_path(
    registry: PluginRegistry, plugin: dict[str, Any], where: str, message: str
) -> None:
    data = config([{"type": "topology-extractor"}, {"type": "queue-scorer"}, plugin])
    with pytest.raises(ConfigError) as info:
        load_config(data, registry)
    text = str(info.value)
    assert where in text and message in text, text


def test_producer_of_another_no_op_type_fails_at_build() -> None:
    """A producer name that the loader cannot tell apart (a no-op type) is refused when the
    scheduler is built, with the parameter's path."""
    data = config(
        [
            {"type": "metrics-data-source"},
            {"type": "queue-scorer"},
            {"type": "topology-affinity-scorer", "parameters": {"topologyProducerName": "metrics-data-source"}},
        ]
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"plugins\[2\]\.parameters\.topologyProducerName"):
        build(data)


def test_defaults_resolve_as_upstream(registry: PluginRegistry) -> None:
    data = config(
        [
            {"type": "topology-extractor", "parameters": {"hostname": None}},
            {"type": "topology-affinity-filter", "parameters": {"minAffinity": ""}},
            {"type": "topology-affinity-scorer", "parameters": {"topologyProducerName": None}},
        ]
    )
    cfg = load_config(data, registry)
    assert cfg.plugins["topology-extractor"].parameters() == {
        "hostname": HOST,
        "rack": RACK,
        "zone": ZONE,
        "region": REGION,
    }
    assert cfg.plugins["topology-affinity-filter"].parameters() == {
        "topologyProducerName": "",
        "minAffinity": "host",
    }
    assert load_config(cfg.to_dict(), registry).to_dict() == cfg.to_dict()


# -- through P/D ------------------------------------------------------------------------------------


def pd_scheduler(data: dict[str, Any]) -> Scheduler:
    """The built-in disagg-profile-handler, which publishes the first stage's pick."""
    return build(data, seed=0)


def test_corpus_config_places_prefill_next_to_the_decode_pick() -> None:
    """upstream's pd-topology config: the prefill pick is the candidate on the decode pod's host;
    with none there, the nearest level wins through the scorer (the filter fails open)."""
    s = pd_scheduler(yaml.safe_load(CORPUS.read_text()))
    decode = ep("decode", 0, "decode", host="h1", rack="r1", zone="z1", region="g1")
    prefills = [c for c in candidates() if c.name != "bare"]
    r = s.schedule(SchedulingRequest("a", "m", token_ids=list(range(256))), [decode, *prefills])
    assert r.target is decode
    prefill = r.profile_results["prefill"]
    assert names(prefill.targets) == ["same-host"]
    assert prefill.candidates == [prefills[0].id]
    assert r.headers["x-prefiller-host-port"] == prefills[0].id

    fresh = list(range(1000, 1256))  # uncached on the decode pod: the decider wants prefill
    r = s.schedule(SchedulingRequest("b", "m", token_ids=fresh), [decode, *prefills[1:]])
    prefill = r.profile_results["prefill"]
    assert len(prefill.candidates) == 4  # nobody on h1: every prefill pod kept
    assert prefill.scores["topology-affinity-scorer"] == {
        prefills[1].id: 0.2,
        prefills[2].id: 0.05,
        prefills[3].id: 0.02,
        prefills[4].id: 0.0,
    }
    assert names(prefill.targets) == ["same-rack"]


def test_corpus_config_without_topology_labels_schedules_every_prefill_pod() -> None:
    s = pd_scheduler(yaml.safe_load(CORPUS.read_text()))
    eps = [ep("decode", 0, "decode"), ep("p1", 1), ep("p2", 2)]
    r = s.schedule(SchedulingRequest("a", "m", token_ids=list(range(256))), eps)
    prefill = r.profile_results["prefill"]
    assert prefill.candidates == [eps[1].id, eps[2].id]
    assert set(prefill.scores["topology-affinity-scorer"].values()) == {0.0}


def test_prefill_first_places_decode_next_to_the_prefill_pick() -> None:
    data = config(
        [
            {"type": "disagg-profile-handler", "parameters": {"stageOrder": "prefill-first"}},
            {"type": "prefill-filter"},
            {"type": "decode-filter"},
            {"type": "topology-extractor"},
            {"type": "topology-affinity-filter", "parameters": {"minAffinity": "zone"}},
            {"type": "queue-scorer"},
            {"type": "max-score-picker"},
        ],
        [
            {"name": "prefill", "plugins": [{"pluginRef": "prefill-filter"}, {"pluginRef": "queue-scorer"}]},
            {
                "name": "decode",
                "plugins": [
                    {"pluginRef": "decode-filter"},
                    {"pluginRef": "topology-affinity-filter"},
                    {"pluginRef": "queue-scorer"},
                ],
            },
        ],
    )  # fmt: skip
    s = pd_scheduler(data)
    eps = [
        ep("prefill", 0, "prefill", host="h1", zone="z1"),
        ep("decode-far", 1, "decode", host="h2", zone="z2"),
        ep("decode-zone", 2, "decode", host="h3", zone="z1"),
    ]
    r = s.schedule(SchedulingRequest("a", "m", token_ids=list(range(64))), eps)
    assert r.profile_target("prefill") is eps[0]
    assert r.target is eps[2] and r.candidates == [eps[2].id]
