"""Upstream EndpointPickerConfig files users paste (llm-d router perf configs, the llm-d
precise-prefix guide) build working schedulers, with warnings for what this host does itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler import (
    Endpoint,
    PluginRegistry,
    Scheduler,
    SchedulingRequest,
    load_config,
    make_plugin_manager,
)

from .conftest import config, endpoints

OPTIMIZED_BASELINE = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: no-hit-lru-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: no-hit-lru-scorer
    weight: 2
"""

OPTIMIZED_BASELINE_PRODUCER = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: approx-prefix-cache-producer
  parameters: {maxPrefixTokensToMatch: 100000, blockSizeTokens: 16}
- type: prefix-cache-scorer
- type: no-hit-lru-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: no-hit-lru-scorer
    weight: 2
"""

PRECISE_PERF = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: token-producer
    parameters:
      modelName: Qwen/Qwen3-8B
      vllm: {url: "http://localhost:8000"}
  - type: endpoint-notification-source
  - type: inflight-load-producer
  - type: precise-prefix-cache-producer
    parameters:
      tokenProcessorConfig: {blockSizeTokens: 16}
      speculativeIndexing: true
      indexerConfig:
        kvBlockIndexConfig: {enableMetrics: true}
      kvEventsConfig:
        topicFilter: "kv@"
        concurrency: 32
        discoverPods: true
        podDiscoveryConfig: {socketPort: 5557}
  - type: prefix-cache-scorer
    parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}
  - type: active-request-scorer
  - type: kv-cache-utilization-scorer
  - type: no-hit-lru-scorer
    parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}
  - type: max-score-picker
dataLayer:
  sources:
    - pluginRef: endpoint-notification-source
      extractors: [{pluginRef: precise-prefix-cache-producer}]
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: active-request-scorer
        weight: 4
      - pluginRef: kv-cache-utilization-scorer
        weight: 2
      - pluginRef: prefix-cache-scorer
        weight: 2
      - pluginRef: no-hit-lru-scorer
        weight: 2
      - pluginRef: max-score-picker
"""

PRECISE_GUIDE = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: tokenizer
    parameters:
      modelName: Qwen/Qwen3-32B
      udsTokenizerConfig: {socketFile: /tmp/tokenizer/tokenizer-uds.socket}
  - type: endpoint-notification-source
  - type: metrics-data-source
  - type: core-metrics-extractor
  - type: single-profile-handler
  - type: decode-filter
  - type: precise-prefix-cache-scorer
    parameters:
      tokenProcessorConfig: {blockSize: 64}
      speculativeIndexing: true
      indexerConfig:
        tokenizersPoolConfig:
          modelName: Qwen/Qwen3-32B
          workersCount: 24
          uds: {socketFile: /tmp/tokenizer/tokenizer-uds.socket}
        kvBlockIndexConfig: {enableMetrics: true}
      kvEventsConfig:
        topicFilter: "kv@"
        concurrency: 8
        discoverPods: true
        podDiscoveryConfig: {socketPort: 5556}
  - type: kv-cache-utilization-scorer
  - type: queue-scorer
  - type: no-hit-lru-scorer
  - type: max-score-picker
dataLayer:
  sources:
    - pluginRef: metrics-data-source
      extractors: [{pluginRef: core-metrics-extractor}]
    - pluginRef: endpoint-notification-source
      extractors: [{pluginRef: precise-prefix-cache-scorer}]
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: decode-filter
      - pluginRef: kv-cache-utilization-scorer
        weight: 2.0
      - pluginRef: queue-scorer
        weight: 2.0
      - pluginRef: precise-prefix-cache-scorer
        weight: 3.0
      - pluginRef: no-hit-lru-scorer
        weight: 2.0
      - pluginRef: max-score-picker
"""

RANDOM_BASELINE = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: passthrough-parser
  - type: random-picker
requestHandler:
  parsers: [{pluginRef: passthrough-parser}]
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: random-picker
"""

TOKENIZER_IN_PROFILE = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: tokenizer
    parameters: {modelName: meta-llama/Llama-3.1-8B-Instruct}
  - type: load-aware-scorer
  - type: max-score-picker
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: tokenizer
        weight: 1
      - pluginRef: load-aware-scorer
        weight: 1
      - pluginRef: max-score-picker
"""


def build(text: str | dict[str, Any]) -> Scheduler:
    return Scheduler.from_config(text, plugin_manager=make_plugin_manager(use_env=False), seed=0)


@pytest.mark.parametrize(
    ("text", "weights"),
    [
        (
            OPTIMIZED_BASELINE,
            {
                "queue-scorer": 2,
                "kv-cache-utilization-scorer": 2,
                "prefix-cache-scorer": 3,
                "no-hit-lru-scorer": 2,
            },
        ),
        (
            PRECISE_PERF,
            {
                "active-request-scorer": 4,
                "kv-cache-utilization-scorer": 2,
                "prefix-cache-scorer": 2,
                "no-hit-lru-scorer": 2,
            },
        ),
        (
            PRECISE_GUIDE,
            {
                "kv-cache-utilization-scorer": 2,
                "queue-scorer": 2,
                "precise-prefix-cache-scorer": 3,
                "no-hit-lru-scorer": 2,
            },
        ),
        (RANDOM_BASELINE, {}),
    ],
    ids=["optimized-baseline", "precise-perf", "precise-guide", "random-baseline"],
)
def test_upstream_configs_build_and_schedule(text: str, weights: dict[str, float]) -> None:
    """Each builds, keeps its weights, and schedules a request."""
    s = build(text)
    prof = s.config.profiles["default"]
    assert {r.name: r.weight for r in prof.scorers} == weights
    eps = endpoints(3)
    r = s.schedule(SchedulingRequest("r", "m", token_ids=list(range(100))), eps)
    assert r.target in eps
    assert set(r.weights) == set(weights)
    s.close()


def test_precise_guide_warns_about_what_is_done_here() -> None:
    """The guide's tokenizer sidecar, renamed tokenizer type and data layer produce warnings."""
    s = build(PRECISE_GUIDE)
    text = "\n".join(s.config.warnings)
    assert "plugins[0].type: plugin type 'tokenizer' is deprecated; use 'token-producer'" in text
    assert "tokenizersPoolConfig.modelName ignored" in text
    assert "tokenizersPoolConfig.uds ignored" in text
    assert "section 'dataLayer'" in text
    params = s.plugin("precise-prefix-cache-scorer").params
    assert params.tokenizers_pool_config.workers_count == 24
    assert params.kv_events_config.discover_pods
    assert params.kv_events_config.socket_port == 5556
    assert s.plugin("no-hit-lru-scorer").producer_name is None  # reads the one prefix plugin
    s.close()


def test_precise_perf_no_hit_lru_reads_the_named_producer() -> None:
    """In the split form both consumers read the precise producer's index."""
    s = build(PRECISE_PERF)
    producer = s.plugin("precise-prefix-cache-producer")
    eps = endpoints(3)
    prompt = list(range(64))
    producer.indexer.index.add(eps[1].id, producer.indexer.block_keys(prompt, "m")[:2])
    r = s.schedule(SchedulingRequest("r", "m", token_ids=prompt), eps)
    assert r.scores["no-hit-lru-scorer"] == dict.fromkeys((e.id for e in eps), 0.5)
    assert r.scores["prefix-cache-scorer"][eps[1].id] == 0.5
    s.close()


def test_prefix_scorer_reads_a_configured_default_approx_producer() -> None:
    """prefix-cache-scorer without a producer name scores from approx-prefix-cache-producer when
    one is configured, so the producer's parameters (here its block size) apply."""
    s = build(OPTIMIZED_BASELINE_PRODUCER)
    scorer = s.plugin("prefix-cache-scorer")
    producer = s.plugin("approx-prefix-cache-producer")
    assert scorer.producer_name == "approx-prefix-cache-producer"
    eps = endpoints(2)
    prompt = list(range(64))
    first = s.schedule(SchedulingRequest("a", "m", token_ids=prompt), eps)
    assert producer.history.size(first.target.id) == 4  # 64 tokens in 16-token blocks
    assert scorer.history.size(first.target.id) == 0  # no second, parallel history
    second = s.schedule(SchedulingRequest("b", "m", token_ids=prompt), eps)
    assert second.scores["prefix-cache-scorer"][first.target.id] == 1.0
    assert second.target is first.target
    s.close()


def test_delegating_prefix_scorer_prepares_nothing_itself() -> None:
    """A prefix-cache-scorer reading a producer does not estimate tokens of its own."""
    s = build(PRECISE_PERF)
    req = SchedulingRequest("r", "m", prompt="hello " * 100)
    s.plugin("prefix-cache-scorer").prepare(req)
    assert not any(k.startswith("prefix-cache-scorer") for k in req.state)
    s.close()


def test_untokenizable_request_through_a_producer_scores_zero_uncounted_as_failure() -> None:
    """A precise producer that cannot tokenize makes the reading scorer score 0, not fail."""
    s = build(PRECISE_PERF)
    eps = endpoints(2)
    r = s.schedule(SchedulingRequest("r", "no-such-model", prompt="hello"), eps)
    assert set(r.scores["prefix-cache-scorer"].values()) == {0.0}
    assert r.errors == {}
    s.close()


def test_non_scoring_plugin_in_a_profile_is_skipped_with_a_warning() -> None:
    """An upstream no-op type listed (even weighted) in a profile is skipped with a warning."""
    s = build(TOKENIZER_IN_PROFILE)
    prof = s.config.profiles["default"]
    assert [r.name for r in prof.scorers] == ["load-aware-scorer"]
    assert any(
        w.startswith("schedulingProfiles[0].plugins[0].pluginRef: plugin 'tokenizer'")
        and "ignored in this profile" in w
        for w in s.config.warnings
    )
    s.close()


def test_every_parameter_error_is_reported_with_the_valid_keys(registry: PluginRegistry) -> None:
    """All bad parameters of a plugin are reported, each with its path; unknown keys list the
    valid ones, nested ones included."""
    data = config(
        [
            {
                "type": "precise-prefix-cache-scorer",
                "parameters": {
                    "tokenProcessorConfig": {"blockSiz": 16},
                    "kvEventsConfig": {"topicFiltr": "kv@"},
                    "speculativeTTL": "soon",
                },
            },
            {"type": "max-score-picker", "parameters": {"maxNumOfEndpoint": 2}},
        ]
    )
    with pytest.raises(ConfigError) as info:
        load_config(data, registry)
    errors = {e.path: e.message for e in info.value.errors}  # type: ignore[attr-defined]
    assert set(errors) == {
        "plugins[0].parameters.tokenProcessorConfig.blockSiz",
        "plugins[0].parameters.kvEventsConfig.topicFiltr",
        "plugins[0].parameters.speculativeTTL",
        "plugins[1].parameters.maxNumOfEndpoint",
    }
    assert errors["plugins[0].parameters.tokenProcessorConfig.blockSiz"].startswith(
        "unknown key; did you mean 'blockSize'? (valid: blockSize, "
    )
    assert "topicFilter" in errors["plugins[0].parameters.kvEventsConfig.topicFiltr"]
    assert errors["plugins[1].parameters.maxNumOfEndpoint"] == (
        "unknown key; did you mean 'maxNumOfEndpoints'? (valid: maxNumOfEndpoints, tieBreak)"
    )


def test_removed_upstream_type_fails_naming_the_path(registry: PluginRegistry) -> None:
    """A GIE v0.5 filter removed upstream is an error at its type's path listing known types."""
    data = config([{"type": "low-queue-filter", "parameters": {"threshold": 128}}])
    with pytest.raises(ConfigError) as info:
        load_config(data, registry)
    assert info.value.path == "plugins[0].type"
    assert "known types:" in info.value.message and "no-hit-lru-scorer" in info.value.message


# -- the corpus of upstream-style configurations --------------------------------------------------

CORPUS = sorted((Path(__file__).parent / "upstream_corpus").glob("*.yaml"))


def test_corpus_is_there() -> None:
    """The corpus holds the published configuration shapes (not vacuously empty)."""
    assert len(CORPUS) >= 15


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_corpus_validates_and_names_every_no_op(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kvaware validate` accepts each corpus file (which names its upstream source), and every
    type it accepts as a no-op is named in a warning."""
    from kvaware_scorer.cli import main
    from kvaware_scorer.plugins.compat import INERT_TYPES

    text = path.read_text()
    assert text.startswith("# Source: "), "each corpus file names its upstream source"
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    used = {e["type"] for e in yaml.safe_load(text).get("plugins") or []}
    for inert in used & set(INERT_TYPES):
        assert any(inert in line and "does nothing" in line for line in out.splitlines()), inert


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_corpus_resolved_yaml_loads_back(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The resolved form of each corpus file (every default written out) validates again."""
    from kvaware_scorer.cli import main

    assert main(["validate", "--resolved-yaml", str(path)]) == 0
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(capsys.readouterr().out)
    assert main(["validate", str(resolved)]) == 0, capsys.readouterr().err


def role_fleet() -> list[Endpoint]:
    roles = ["decode", "decode", "prefill", "prefill", "encode"]
    return [
        Endpoint(f"{r}-{i}", f"10.1.0.{i}", 8000, {"llm-d.ai/role": r}) for i, r in enumerate(roles)
    ]


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_corpus_schedules(path: Path) -> None:
    """Each corpus configuration builds a scheduler that schedules a request."""
    s = Scheduler.from_config(
        yaml.safe_load(path.read_text()) or {},
        plugin_manager=make_plugin_manager(use_env=False),
        seed=0,
    )
    try:
        r = s.schedule(SchedulingRequest("r", "m", token_ids=list(range(256))), role_fleet())
    finally:
        s.close()
    assert r.targets


def corpus(name: str, registry: PluginRegistry) -> Any:
    return load_config(
        yaml.safe_load((Path(__file__).parent / "upstream_corpus" / name).read_text()), registry
    )


def test_corpus_semantics(registry: PluginRegistry) -> None:
    """What the corpus files mean here is upstream's meaning: defaults when no plugins, the
    default producer bound beside two producers, nanosecond durations, block-size precedence."""
    weights = {
        s.name: s.weight for s in corpus("defaults-only.yaml", registry).profiles["default"].scorers
    }
    assert weights == {
        "queue-scorer": 2,
        "kv-cache-utilization-scorer": 2,
        "prefix-cache-scorer": 3,
    }
    two = corpus("no-hit-lru-two-producers.yaml", registry)
    assert two.plugins["no-hit-lru-scorer"].parameters()["prefixMatchInfoProducerName"] == (
        "approx-prefix-cache-producer"
    )
    sim = corpus("precise-kvcache-sim.yaml", registry).plugins["precise-prefix-cache-producer"]
    assert sim.parameters()["kvBlockIndexConfig"]["metricsLoggingInterval"] == 60.0
    older = corpus("kv-cache-older-index.yaml", registry).plugins["precise-prefix-cache-scorer"]
    assert older.parameters()["tokenProcessorConfig"]["blockSize"] == 64


def test_resolved_yaml_keeps_flow_control(registry: PluginRegistry) -> None:
    """The resolved form keeps the upstream sections (flowControl configures flow control)."""
    cfg = corpus("probabilistic-admitter.yaml", registry)
    again = load_config(cfg.to_dict(), registry)
    assert again.ignored["flowControl"] == {
        "saturationDetector": {"pluginRef": "utilization-detector"}
    }
