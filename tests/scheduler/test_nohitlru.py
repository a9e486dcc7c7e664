"""no-hit-lru-scorer: cold requests spread over least recently used pods, warm ones neutral."""

from __future__ import annotations

from typing import Any

import pytest

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler import (
    Endpoint,
    Scheduler,
    SchedulingRequest,
    make_plugin_manager,
)

from .conftest import config, endpoints


def build(plugins: list[dict[str, Any]], refs: list[dict[str, Any]], **kw: Any) -> Scheduler:
    return Scheduler.from_config(
        config(plugins, [{"name": "default", "plugins": refs}]),
        plugin_manager=make_plugin_manager(use_env=False),
        seed=0,
        **kw,
    )


def lru_only(**params: Any) -> Scheduler:
    """no-hit-lru-scorer alone (no prefix plugin: every request is cold)."""
    return build(
        [{"type": "no-hit-lru-scorer", "parameters": params}],
        [{"pluginRef": "no-hit-lru-scorer"}],
    )


def lru_scores(s: Scheduler, eps: list[Endpoint], rid: str = "r") -> dict[str, float]:
    r = s.schedule(SchedulingRequest(rid, "m", token_ids=[1, 2, 3]), eps, dry_run=True)
    return {e.name: r.scores["no-hit-lru-scorer"][e.id] for e in eps}


def test_cold_requests_rank_never_used_first_then_least_recently_used() -> None:
    """Never-used pods score 1 - i/(N-1) in candidate order, used ones after them, oldest first."""
    s = lru_only()
    eps = endpoints(4)
    assert lru_scores(s, eps) == pytest.approx(
        {"pod-0": 1.0, "pod-1": 2 / 3, "pod-2": 1 / 3, "pod-3": 0.0}
    )
    scorer = s.plugin("no-hit-lru-scorer")
    picks = [
        s.schedule(SchedulingRequest(f"c{i}", "m", token_ids=[9]), eps).target for i in range(4)
    ]
    # each cold pick goes to the pod that served a cold request longest ago: a round robin
    assert [e.name for e in picks] == ["pod-0", "pod-1", "pod-2", "pod-3"]
    assert scorer.recent() == [e.id for e in eps]
    s.schedule(SchedulingRequest("again", "m", token_ids=[9]), eps)  # pod-0 again, now MRU
    assert lru_scores(s, eps) == pytest.approx(
        {"pod-1": 1.0, "pod-2": 2 / 3, "pod-3": 1 / 3, "pod-0": 0.0}
    )


def test_ranks_are_among_the_candidates() -> None:
    """Pods outside the candidate list do not push the candidates' scores to 0."""
    s = lru_only()
    eps = endpoints(5)
    for i in range(5):
        s.schedule(SchedulingRequest(f"c{i}", "m", token_ids=[1]), eps)
    assert lru_scores(s, [eps[3], eps[4]]) == {"pod-3": 1.0, "pod-4": 0.0}
    assert lru_scores(s, [eps[2]]) == {"pod-2": 1.0}


def test_warm_requests_are_neutral_and_leave_the_lru_alone() -> None:
    """A request some candidate holds a prefix of scores 0.5 everywhere and updates no LRU."""
    s = build(
        [
            {
                "type": "precise-prefix-cache-scorer",
                "parameters": {
                    "speculativeIndexing": False,
                    "tokenProcessorConfig": {"blockSize": 4},
                },
            },
            {"type": "no-hit-lru-scorer"},
        ],
        [{"pluginRef": "precise-prefix-cache-scorer"}, {"pluginRef": "no-hit-lru-scorer"}],
    )
    precise = s.plugin("precise-prefix-cache-scorer")
    lru = s.plugin("no-hit-lru-scorer")
    eps = endpoints(3)
    prompt = list(range(16))
    precise.indexer.index.add(eps[2].id, precise.indexer.block_keys(prompt, "m")[:1])
    r = s.schedule(SchedulingRequest("warm", "m", token_ids=prompt), eps)
    assert r.scores["no-hit-lru-scorer"] == dict.fromkeys((e.id for e in eps), 0.5)
    assert r.target is eps[2]
    assert lru.recent() == []
    cold = s.schedule(SchedulingRequest("cold", "m", token_ids=[7] * 16), eps)
    assert cold.scores["no-hit-lru-scorer"][eps[0].id] == 1.0
    assert lru.recent() == [cold.target.id]


def test_one_index_lookup_shared_by_the_prefix_scorer_and_no_hit_lru() -> None:
    """The precise producer's lookup runs once per scheduling call although two plugins read it."""
    s = build(
        [
            {
                "type": "precise-prefix-cache-producer",
                "parameters": {"tokenProcessorConfig": {"blockSize": 4}},
            },
            {
                "type": "prefix-cache-scorer",
                "parameters": {"prefixMatchInfoProducerName": "precise-prefix-cache-producer"},
            },
            {
                "type": "no-hit-lru-scorer",
                "parameters": {"prefixMatchInfoProducerName": "precise-prefix-cache-producer"},
            },
        ],
        [{"pluginRef": "no-hit-lru-scorer", "weight": 2}, {"pluginRef": "prefix-cache-scorer"}],
    )
    lookups = s.plugin("precise-prefix-cache-producer").indexer.metrics.lookups
    before = lookups._value.get()
    eps = endpoints(3)
    s.schedule(SchedulingRequest("a", "m", token_ids=list(range(16))), eps)
    assert lookups._value.get() - before == 1
    # a second call (a retry on fewer endpoints) looks up again
    req = SchedulingRequest("b", "m", token_ids=list(range(16)))
    s.schedule(req, eps)
    s.schedule(req, eps[1:])
    assert lookups._value.get() - before == 3


def test_default_producer_is_the_one_prefix_plugin() -> None:
    """Without prefixMatchInfoProducerName the scorer reads the one prefix plugin configured."""
    s = build(
        [{"type": "prefix-cache-scorer"}, {"type": "no-hit-lru-scorer"}],
        [{"pluginRef": "prefix-cache-scorer", "weight": 3}, {"pluginRef": "no-hit-lru-scorer"}],
    )
    eps = endpoints(3)
    prompt = list(range(64 * 4))
    first = s.schedule(SchedulingRequest("a", "m", token_ids=prompt), eps)
    assert first.scores["no-hit-lru-scorer"][eps[0].id] == 1.0  # cold
    second = s.schedule(SchedulingRequest("b", "m", token_ids=prompt), eps)
    assert set(second.scores["no-hit-lru-scorer"].values()) == {0.5}  # the history hits
    assert second.target is first.target


def test_no_prefix_plugin_adds_upstreams_default_producer() -> None:
    """Without any prefix plugin, upstream auto-creates its default producer for a consumer
    that requires match info: approx-prefix-cache-producer is added (with a warning) and the
    scorer reads its routing history, so a repeated long prompt is no longer cold."""
    s = lru_only()
    cfg = s.config
    added = cfg.plugins["approx-prefix-cache-producer"]
    assert added.injected
    assert any(
        "no prefix producer is configured: added 'approx-prefix-cache-producer'" in w
        for w in cfg.warnings
    )
    assert not any("every request counts as a miss" in w for w in cfg.warnings)
    eps = endpoints(3)
    prompt = list(range(64 * 4))
    first = s.schedule(SchedulingRequest("a", "m", token_ids=prompt), eps)
    assert first.scores["no-hit-lru-scorer"][eps[0].id] == 1.0  # cold
    second = s.schedule(SchedulingRequest("b", "m", token_ids=prompt), eps)
    assert set(second.scores["no-hit-lru-scorer"].values()) == {0.5}  # the history hits


def test_no_producer_is_added_for_a_consumer_naming_one() -> None:
    """A consumer that names its producer gets no default added: the name is checked instead."""
    with pytest.raises(ConfigError, match="names no plugin"):
        build(
            [{"type": "no-hit-lru-scorer", "parameters": {"prefixMatchInfoProducerName": "x"}}],
            [{"pluginRef": "no-hit-lru-scorer"}],
        )


def test_several_prefix_producers_bind_to_the_default_producer() -> None:
    """Beside two named prefix producers, a no-hit-lru-scorer naming none reads upstream's
    default producer (approx-prefix-cache-producer, added), with a warning."""
    s = build(
        [
            {"type": "precise-prefix-cache-producer", "name": "precise"},
            {"type": "approx-prefix-cache-producer", "name": "approx"},
            {
                "type": "prefix-cache-scorer",
                "name": "p1",
                "parameters": {"prefixMatchInfoProducerName": "precise"},
            },
            {
                "type": "prefix-cache-scorer",
                "name": "p2",
                "parameters": {"prefixMatchInfoProducerName": "approx"},
            },
            {"type": "no-hit-lru-scorer"},
        ],
        [{"pluginRef": "no-hit-lru-scorer"}, {"pluginRef": "p1"}, {"pluginRef": "p2"}],
    )
    cfg = s.config
    lru = cfg.plugins["no-hit-lru-scorer"].parameters()
    assert lru["prefixMatchInfoProducerName"] == "approx-prefix-cache-producer"
    assert cfg.plugins["approx-prefix-cache-producer"].injected
    assert any("upstream's default producer" in w for w in cfg.warnings)
    eps = endpoints(2)
    prompt = list(range(64 * 4))
    first = s.schedule(SchedulingRequest("a", "m", token_ids=prompt), eps)
    assert first.scores["no-hit-lru-scorer"][eps[0].id] == 1.0  # cold: nothing recorded yet
    second = s.schedule(SchedulingRequest("b", "m", token_ids=prompt), eps)
    assert set(second.scores["no-hit-lru-scorer"].values()) == {0.5}  # the default producer hit


@pytest.mark.parametrize("ref", ["missing", "queue-scorer"])
def test_producer_reference_checked(ref: str) -> None:
    """prefixMatchInfoProducerName (or the legacy prefixPluginName) must name a producer."""
    for key in ("prefixMatchInfoProducerName", "prefixPluginName"):
        with pytest.raises(ConfigError) as info:
            build(
                [{"type": "queue-scorer"}, {"type": "no-hit-lru-scorer", "parameters": {key: ref}}],
                [{"pluginRef": "no-hit-lru-scorer"}, {"pluginRef": "queue-scorer"}],
            )
        assert info.value.path == "plugins[1].parameters.prefixMatchInfoProducerName"


def test_legacy_parameters_accepted_with_warnings() -> None:
    """Upstream's deprecated prefixPluginName / prefixPluginType load with warnings."""
    s = build(
        [
            {"type": "prefix-cache-scorer"},
            {
                "type": "no-hit-lru-scorer",
                "parameters": {
                    "prefixPluginName": "prefix-cache-scorer",
                    "prefixPluginType": "prefix-cache-scorer",
                    "lruSize": 0,
                },
            },
        ],
        [{"pluginRef": "no-hit-lru-scorer"}, {"pluginRef": "prefix-cache-scorer"}],
    )
    text = "\n".join(s.config.warnings)
    assert "'prefixPluginName' is deprecated" in text
    assert "'prefixPluginType' is deprecated" in text
    lru = s.plugin("no-hit-lru-scorer")
    assert lru.producer_name == "prefix-cache-scorer"
    assert lru.size == 1024


def test_lru_is_bounded_and_forgets_removed_pods() -> None:
    """lruSize bounds the pods remembered; pods leaving the pool are forgotten."""
    s = lru_only(lruSize=2)
    eps = endpoints(3)
    s.set_endpoints(eps)
    for i in range(3):
        s.schedule(SchedulingRequest(f"c{i}", "m", token_ids=[1]))
    lru = s.plugin("no-hit-lru-scorer")
    assert lru.recent() == [eps[1].id, eps[2].id]
    s.set_endpoints(eps[:2])
    assert lru.recent() == [eps[1].id]


def test_explain_runs_no_lru_update() -> None:
    """A dry run (POST /v1/score) scores cold requests but moves no pod in the LRU."""
    s = lru_only()
    eps = endpoints(2)
    s.schedule(SchedulingRequest("x", "m", token_ids=[1]), eps, dry_run=True)
    assert s.plugin("no-hit-lru-scorer").recent() == []


def test_prefill_profile_parameter_of_older_upstream_accepted() -> None:
    """Older upstream releases name the recorded prefill profile (prefillProfile); it loads and
    is the profile whose pick a cold request also records."""
    s = lru_only(prefillProfile="pf")
    assert s.plugin("no-hit-lru-scorer").prefill_profile == "pf"
    assert lru_only().plugin("no-hit-lru-scorer").prefill_profile == "prefill"
