"""EndpointPickerConfig loading: strictness, upstream defaults, aliases, ignored sections."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvaware_scorer import IndexerConfig
from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler import (
    ConfigErrorGroup,
    PluginRegistry,
    Scheduler,
    load_config,
    make_plugin_manager,
    parse_duration,
)

from .conftest import config

ROOT = Path(__file__).resolve().parents[2]


def errors_of(data: Any, registry: PluginRegistry) -> list[ConfigError]:
    with pytest.raises(ConfigError) as info:
        load_config(data, registry)
    exc = info.value
    return exc.errors if isinstance(exc, ConfigErrorGroup) else [exc]


def paths_of(data: Any, registry: PluginRegistry) -> list[str | None]:
    return [e.path for e in errors_of(data, registry)]


def test_defaults_name_weight_handler_and_picker(registry: PluginRegistry) -> None:
    """Name defaults to type, weight to 1.0, and single-profile-handler and max-score-picker are injected."""
    cfg = load_config(
        config(
            [{"type": "queue-scorer"}, {"type": "kv-cache-utilization-scorer", "name": "kv"}],
            [
                {
                    "name": "p",
                    "plugins": [{"pluginRef": "queue-scorer"}, {"pluginRef": "kv", "weight": 2}],
                }
            ],
        ),
        registry,
    )
    prof = cfg.profiles["p"]
    assert [(s.name, s.weight) for s in prof.scorers] == [("queue-scorer", 1.0), ("kv", 2.0)]
    assert prof.picker == "max-score-picker"
    assert cfg.profile_handler == "single-profile-handler"
    assert cfg.plugins["max-score-picker"].injected
    assert cfg.plugins["single-profile-handler"].injected
    assert cfg.plugins["kv"].type == "kv-cache-utilization-scorer"


def test_no_profiles_gives_default_profile_with_everything(registry: PluginRegistry) -> None:
    """Without schedulingProfiles a 'default' profile holds every filter, scorer and picker in order."""
    cfg = load_config(
        config(
            [
                {"type": "decode-filter"},
                {"type": "queue-scorer"},
                {"type": "random-picker"},
                {"type": "load-aware-scorer"},
            ]
        ),
        registry,
    )
    prof = cfg.profiles["default"]
    assert prof.filters == ["decode-filter"]
    assert [s.name for s in prof.scorers] == ["queue-scorer", "load-aware-scorer"]
    assert all(s.weight == 1.0 for s in prof.scorers)
    assert prof.picker == "random-picker"
    assert "max-score-picker" not in cfg.plugins


def test_parameters_get_their_defaults(registry: PluginRegistry) -> None:
    """Validated parameters carry every default (load-aware threshold 128, speculative TTL 2 s)."""
    cfg = load_config(
        config([{"type": "load-aware-scorer"}, {"type": "precise-prefix-cache-scorer"}]), registry
    )
    assert cfg.plugins["load-aware-scorer"].parameters() == {"threshold": 128}
    precise = cfg.plugins["precise-prefix-cache-scorer"].parameters()
    assert precise["speculativeIndexing"] is True
    assert precise["speculativeTTL"] == 2.0
    assert precise["tokenProcessorConfig"]["blockSize"] == 16


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({**config([{"type": "queue-scorer"}]), "extra": 1}, "extra"),
        (config([{"type": "queue-scorer", "nmae": "x"}]), "plugins[0].nmae"),
        (config([{"type": "queue-scorer"}, {"type": "no-such-scorer"}]), "plugins[1].type"),
        (
            config([{"type": "load-aware-scorer", "parameters": {"x": 1}}]),
            "plugins[0].parameters.x",
        ),
        (
            config([{"type": "load-aware-scorer", "parameters": {"threshold": 0}}]),
            "plugins[0].parameters.threshold",
        ),
        (
            config(
                [
                    {
                        "type": "precise-prefix-cache-scorer",
                        "parameters": {"tokenProcessorConfig": {"blockSize": "x"}},
                    }
                ]
            ),
            "plugins[0].parameters.tokenProcessorConfig.blockSize",
        ),
        (config([{"type": "queue-scorer"}, {"type": "queue-scorer"}]), "plugins[1]"),
        (
            config([{"type": "queue-scorer"}], [{"name": "p", "plugins": [{"pluginRef": "nope"}]}]),
            "schedulingProfiles[0].plugins[0].pluginRef",
        ),
        (
            config(
                [{"type": "queue-scorer"}],
                [{"name": "p", "plugins": [{"pluginRef": "queue-scorer", "weight": "heavy"}]}],
            ),
            "schedulingProfiles[0].plugins[0].weight",
        ),
        (
            config(
                [{"type": "queue-scorer"}],
                [{"name": "p", "plugins": [{"pluginRef": "queue-scorer", "wieght": 2}]}],
            ),
            "schedulingProfiles[0].plugins[0].wieght",
        ),
        (
            config(
                [{"type": "queue-scorer"}],
                [
                    {"name": "p", "plugins": [{"pluginRef": "queue-scorer"}]},
                    {"name": "p", "plugins": [{"pluginRef": "queue-scorer"}]},
                ],
            ),
            "schedulingProfiles[1].name",
        ),
        (
            config(
                [{"type": "random-picker"}, {"type": "max-score-picker"}],
                [
                    {
                        "name": "p",
                        "plugins": [
                            {"pluginRef": "random-picker"},
                            {"pluginRef": "max-score-picker"},
                        ],
                    }
                ],
            ),
            "schedulingProfiles[0].plugins[1].pluginRef",
        ),
        ({**config([{"type": "queue-scorer"}]), "apiVersion": "v1"}, "apiVersion"),
        ({**config([{"type": "queue-scorer"}]), "kind": "Pod"}, "kind"),
        (
            config(
                [{"type": "single-profile-handler"}, {"type": "queue-scorer"}],
                [{"name": "p", "plugins": [{"pluginRef": "single-profile-handler"}]}],
            ),
            "schedulingProfiles[0].plugins[0].pluginRef",
        ),
    ],
)
def test_errors_name_the_yaml_path(
    data: dict[str, Any], path: str, registry: PluginRegistry
) -> None:
    """Each invalid configuration is rejected with an error whose path names the offending key."""
    assert path in paths_of(data, registry)


def test_all_errors_are_collected(registry: PluginRegistry) -> None:
    """Several independent problems are all reported, in document order."""
    data = config(
        [{"type": "bogus"}, {"type": "load-aware-scorer", "parameters": {"nope": 1}}],
        [{"name": "p", "plugins": [{"pluginRef": "missing"}]}],
    )
    assert paths_of(data, registry) == [
        "plugins[0].type",
        "plugins[1].parameters.nope",
        "schedulingProfiles[0].plugins[0].pluginRef",
    ]


def test_unknown_type_lists_known_types(registry: PluginRegistry) -> None:
    """An unknown plugin type's error lists the registered types."""
    (err,) = errors_of(config([{"type": "kv-scorer"}]), registry)
    assert "kv-cache-utilization-scorer" in str(err)


def test_several_profiles_refused_by_single_handler(registry: PluginRegistry) -> None:
    """Two profiles without a multi-profile handler are rejected."""
    data = config(
        [{"type": "queue-scorer"}],
        [
            {"name": "a", "plugins": [{"pluginRef": "queue-scorer"}]},
            {"name": "b", "plugins": [{"pluginRef": "queue-scorer"}]},
        ],
    )
    assert errors_of(data, registry)


def test_duplicate_yaml_keys_rejected(registry: PluginRegistry) -> None:
    """A YAML mapping with a repeated key is an error (PyYAML would keep the last silently)."""
    text = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins: []\nplugins: []\n"
    with pytest.raises(ConfigError, match="duplicate key 'plugins'"):
        load_config(text, registry)


def test_deprecated_api_version_warns(
    registry: PluginRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """The GIE apiVersion loads with a DEPRECATION warning."""
    data = {
        **config([{"type": "queue-scorer"}]),
        "apiVersion": "inference.networking.x-k8s.io/v1alpha1",
    }
    with caplog.at_level(logging.WARNING):
        cfg = load_config(data, registry)
    assert any("DEPRECATION" in w for w in cfg.warnings)
    assert "DEPRECATION" in caplog.text


def test_type_aliases_accepted_with_warnings(registry: PluginRegistry) -> None:
    """kv-cache-scorer, by-label and by-label-selector resolve to the current types with warnings."""
    cfg = load_config(
        config(
            [
                {"type": "kv-cache-scorer"},
                {
                    "type": "by-label",
                    "parameters": {"label": "tier", "validValues": ["a"], "allowsNoLabel": True},
                },
                {"type": "by-label-selector", "parameters": {"matchLabels": {"x": "y"}}},
            ]
        ),
        registry,
    )
    assert cfg.plugins["kv-cache-scorer"].type == "kv-cache-utilization-scorer"
    assert cfg.plugins["by-label"].type == "label-selector-filter"
    assert cfg.plugins["by-label-selector"].type == "label-selector-filter"
    assert cfg.profiles["default"].filters == ["by-label", "by-label-selector"]
    assert sum("deprecated" in w for w in cfg.warnings) == 3


@pytest.mark.parametrize("old", ["hashBlockSize", "blockSize"])
def test_parameter_aliases_accepted_with_warnings(old: str, registry: PluginRegistry) -> None:
    """prefix-cache-scorer's hashBlockSize and blockSize become blockSizeTokens with a warning."""
    cfg = load_config(config([{"type": "prefix-cache-scorer", "parameters": {old: 32}}]), registry)
    assert cfg.plugins["prefix-cache-scorer"].parameters()["blockSizeTokens"] == 32
    assert any(old in w and "blockSizeTokens" in w for w in cfg.warnings)


def test_parameter_alias_and_new_name_together_new_wins(registry: PluginRegistry) -> None:
    """Given both a deprecated parameter and its new name, the new one wins with a warning
    naming the old one (upstream's blockSize / blockSizeTokens precedence)."""
    data = config(
        [{"type": "prefix-cache-scorer", "parameters": {"blockSize": 32, "blockSizeTokens": 128}}]
    )
    cfg = load_config(data, registry)
    assert cfg.plugins["prefix-cache-scorer"].parameters()["blockSizeTokens"] == 128
    assert any(w.startswith("plugins[0].parameters.blockSize: deprecated") for w in cfg.warnings)


def test_deprecated_parameter_zero_means_unset(registry: PluginRegistry) -> None:
    """A deprecated parameter with a Go zero value (blockSize: 0) is ignored: the default holds."""
    data = config([{"type": "approx-prefix-cache-producer", "parameters": {"blockSize": 0}}])
    cfg = load_config(data, registry)
    assert cfg.plugins["approx-prefix-cache-producer"].parameters()["blockSizeTokens"] == 64


@pytest.mark.parametrize(("auto_tune", "ok"), [(True, True), (False, False)])
def test_approx_block_size_zero_needs_auto_tune(
    auto_tune: bool, ok: bool, registry: PluginRegistry
) -> None:
    """blockSizeTokens 0 is valid with autoTune (upstream's clamp, 64) and an error without."""
    params = {"blockSizeTokens": 0, "autoTune": auto_tune}
    data = config([{"type": "approx-prefix-cache-producer", "parameters": params}])
    if ok:
        cfg = load_config(data, registry)
        assert cfg.plugins["approx-prefix-cache-producer"].parameters()["blockSizeTokens"] == 64
    else:
        assert paths_of(data, registry) == ["plugins[0].parameters"]


def test_parameterless_type_ignores_parameters_with_a_warning(registry: PluginRegistry) -> None:
    """queue-scorer with parameters loads (upstream ignores them) and the warning names them."""
    data = config([{"type": "queue-scorer", "parameters": {"threshold": 3}}])
    cfg = load_config(data, registry)
    assert any("threshold ignored" in w for w in cfg.warnings)


def test_no_plugins_loads_upstream_defaults(registry: PluginRegistry) -> None:
    """A config without plugins runs upstream's default profile (queue 2, kv 2, prefix 3)."""
    cfg = load_config({"apiVersion": "llm-d.ai/v1alpha1", "kind": "EndpointPickerConfig"}, registry)
    weights = {s.name: s.weight for s in cfg.profiles["default"].scorers}
    assert weights == {
        "queue-scorer": 2,
        "kv-cache-utilization-scorer": 2,
        "prefix-cache-scorer": 3,
    }
    assert any("default profile" in w for w in cfg.warnings)


@pytest.mark.parametrize(
    ("section", "value", "path"),
    [
        ("featureGates", ["noSuchGate"], "featureGates[0]"),
        ("saturationDetector", {"pluginRef": "queue-scorer"}, "saturationDetector.pluginRef"),
        ("saturationDetector", {"pluginRef": "nope"}, "saturationDetector.pluginRef"),
        (
            "flowControl",
            {"saturationDetector": {"pluginRef": "queue-scorer"}},
            "flowControl.saturationDetector.pluginRef",
        ),
        (
            "flowControl",
            {"priorityBands": [{"priority": 0, "fairnessPolicyRef": "queue-scorer"}]},
            "flowControl.priorityBands[0].fairnessPolicyRef",
        ),
        ("flowControl", {"maxRequestz": 3}, "flowControl.maxRequestz"),
        ("parser", {"pluginRef": "queue-scorer"}, "parser.pluginRef"),
        (
            "requestHandler",
            {"parsers": [{"pluginRef": "queue-scorer"}]},
            "requestHandler.parsers[0].pluginRef",
        ),
    ],
)
def test_section_references_need_the_right_role(
    section: str, value: Any, path: str, registry: PluginRegistry
) -> None:
    """Feature gates must be upstream's; flowControl, saturationDetector and parser references
    must name a plugin playing that role."""
    data = {**config([{"type": "queue-scorer"}]), section: value}
    assert path in paths_of(data, registry)


def test_producer_reference_loop_rejected(registry: PluginRegistry) -> None:
    """Two prefix scorers naming each other as their producer is an error naming the loop."""
    data = config(
        [
            {
                "name": "a",
                "type": "prefix-cache-scorer",
                "parameters": {"prefixMatchInfoProducerName": "b"},
            },
            {
                "name": "b",
                "type": "prefix-cache-scorer",
                "parameters": {"prefixMatchInfoProducerName": "a"},
            },
        ]
    )
    (err,) = errors_of(data, registry)
    assert "loop" in err.message and "a -> b -> a" in err.message


def test_precise_accepts_upstream_nested_indexer_config(registry: PluginRegistry) -> None:
    """The upstream indexerConfig nesting, hashSeed as an int and upstream-only values load."""
    cfg = load_config(
        config(
            [
                {
                    "type": "precise-prefix-cache-scorer",
                    "parameters": {
                        "tokenProcessorConfig": {
                            "blockSize": 64,
                            "hashSeed": 42,
                            "hashAlgorithm": "cbor-fnv",
                        },
                        "indexerConfig": {
                            "kvBlockIndexConfig": {
                                "enableMetrics": True,
                                "costAwareMemoryConfig": {"size": "2GiB"},
                            },
                            "kvCacheBackendConfigs": [
                                {"name": "gpu", "weight": 1.0},
                                {"name": "cpu", "weight": 0.8},
                            ],
                        },
                        "kvEventsConfig": {
                            "topicFilter": "kv@",
                            "concurrency": 8,
                            "discoverPods": True,
                            "podDiscoveryConfig": {"socketPort": 5556, "podLabelSelector": "a=b"},
                        },
                        "speculativeTTL": "500ms",
                    },
                }
            ]
        ),
        registry,
    )
    p = cfg.plugins["precise-prefix-cache-scorer"].parameters()
    assert p["tokenProcessorConfig"]["blockSize"] == 64
    assert p["tokenProcessorConfig"]["hashSeed"] == "42"
    assert [b["name"] for b in p["kvCacheBackendConfigs"]] == ["gpu", "cpu"]
    assert p["kvEventsConfig"]["socketPort"] == 5556
    assert p["speculativeTTL"] == 0.5
    assert len(cfg.warnings) == 3  # hashAlgorithm, costAwareMemoryConfig, podLabelSelector


def test_precise_key_in_both_places_rejected(registry: PluginRegistry) -> None:
    """A parameter given at the top level and under indexerConfig is an error with its path."""
    data = config(
        [
            {
                "type": "precise-prefix-cache-scorer",
                "parameters": {
                    "matchLengthWeight": 0.1,
                    "indexerConfig": {"matchLengthWeight": 0.2},
                },
            }
        ]
    )
    assert paths_of(data, registry) == ["plugins[0].parameters.indexerConfig.matchLengthWeight"]


def test_ignored_upstream_sections_validated_and_warned(registry: PluginRegistry) -> None:
    """featureGates, dataLayer, flowControl, requestHandler, saturationDetector and parser load with warnings."""
    data = {
        **config(
            [
                {"type": "queue-scorer"},
                {"type": "metrics-data-source"},
                {"type": "core-metrics-extractor"},
                {"type": "openai-parser"},
            ]
        ),
        "featureGates": ["flowControl", "dataLayer=false"],
        "dataLayer": {
            "sources": [
                {
                    "pluginRef": "metrics-data-source",
                    "extractors": [{"pluginRef": "core-metrics-extractor"}],
                }
            ]
        },
        "flowControl": {"maxBytes": 100},
        "requestHandler": {"parsers": [{"pluginRef": "openai-parser"}]},
        "saturationDetector": {"queueDepthThreshold": 5},
        "parser": {"pluginRef": "openai-parser"},
    }
    cfg = load_config(data, registry)
    assert set(cfg.ignored) == {
        "featureGates",
        "dataLayer",
        "flowControl",
        "requestHandler",
        "saturationDetector",
        "parser",
    }
    assert sum("ignored here" in w for w in cfg.warnings) == 4  # flow control sections are used
    assert sum("does nothing" in w for w in cfg.warnings) == 3


@pytest.mark.parametrize(
    ("section", "value", "path"),
    [
        ("featureGates", "flowControl", "featureGates"),
        ("featureGates", ["bad gate"], "featureGates[0]"),
        ("dataLayer", {"sources": [{"extractors": []}]}, "dataLayer.sources[0].pluginRef"),
        ("dataLayer", {"sourcez": []}, "dataLayer.sourcez"),
        (
            "requestHandler",
            {"parsers": [{"pluginRef": "missing"}]},
            "requestHandler.parsers[0].pluginRef",
        ),
        ("flowControl", [1], "flowControl"),
    ],
)
def test_ignored_sections_shape_checked(
    section: str, value: Any, path: str, registry: PluginRegistry
) -> None:
    """A malformed upstream section is an error naming its path, not silently ignored."""
    data = {**config([{"type": "queue-scorer"}]), section: value}
    assert path in paths_of(data, registry)


GIE_DEFAULT = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: metrics-data-source
  parameters: {scheme: "http", path: "/metrics", insecureSkipVerify: true}
- type: core-metrics-extractor
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
"""

LLMD_PRECISE_V07 = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: single-profile-handler
  - type: decode-filter
  - type: precise-prefix-cache-scorer
    parameters:
      tokenProcessorConfig:
        blockSize: 64
        hashSeed: "42"
      indexerConfig:
        kvBlockIndexConfig: {enableMetrics: true}
  - type: kv-cache-utilization-scorer
  - type: queue-scorer
  - type: max-score-picker
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: decode-filter
      - pluginRef: precise-prefix-cache-scorer
        weight: 2.0
      - pluginRef: kv-cache-utilization-scorer
        weight: 1.0
      - pluginRef: queue-scorer
        weight: 1.0
      - pluginRef: max-score-picker
"""


@pytest.mark.parametrize(
    "text", [GIE_DEFAULT, LLMD_PRECISE_V07], ids=["gie-default", "llmd-precise-v0.7"]
)
def test_real_upstream_configs_build(text: str) -> None:
    """The GIE Helm default and llm-d's precise-prefix config build into working schedulers."""
    sched = Scheduler.from_config(text, plugin_manager=make_plugin_manager(use_env=False))
    assert len(sched.config.profiles["default"].scorers) == 3
    sched.close()


def test_resolved_config_loads_back_unchanged(registry: PluginRegistry) -> None:
    """The resolved form (kvaware validate --resolved-yaml) loads back to the same resolution."""
    first = load_config(Path(ROOT / "config" / "precise.yaml"), registry)
    text = yaml.safe_dump(first.to_dict(), sort_keys=False)
    second = load_config(text, registry)
    assert second.to_dict() == first.to_dict()
    assert not second.warnings


@pytest.mark.parametrize("name", ["random", "load", "estimated", "precise", "kvaware"])
def test_shipped_configs_build(name: str) -> None:
    """Every shipped config/*.yaml builds a scheduler without warnings."""
    sched = Scheduler.from_yaml(
        ROOT / "config" / f"{name}.yaml", plugin_manager=make_plugin_manager(use_env=False)
    )
    assert not sched.config.warnings
    sched.close()


def test_precise_and_estimated_share_load_weights(registry: PluginRegistry) -> None:
    """precise.yaml and estimated.yaml differ only in their prefix scorer (equal-weight comparison)."""
    p = load_config(ROOT / "config" / "precise.yaml", registry).profiles["default"]
    e = load_config(ROOT / "config" / "estimated.yaml", registry).profiles["default"]
    p_load = [(s.name, s.weight) for s in p.scorers if s.name != "precise-prefix-cache-scorer"]
    e_load = [(s.name, s.weight) for s in e.scorers if s.name != "prefix-cache-scorer"]
    assert p_load == e_load
    assert (
        dict((s.name, s.weight) for s in p.scorers)["precise-prefix-cache-scorer"]
        == dict((s.name, s.weight) for s in e.scorers)["prefix-cache-scorer"]
    )


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(2, 2.0), (0.5, 0.5), ("2s", 2.0), ("500ms", 0.5), ("1m", 60.0), ("1.5h", 5400.0)],
)
def test_parse_duration(value: Any, seconds: float) -> None:
    """Durations are seconds or Go-style strings."""
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["2 parsecs", -1, True, None, "ms"])
def test_parse_duration_rejects(value: Any) -> None:
    """Anything else is a ValueError."""
    with pytest.raises(ValueError):
        parse_duration(value)


LLMD_SPLIT_FORM = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: token-producer
    parameters: {modelName: hf-repo/model-name, vllm: {url: http://localhost:8000}}
  - type: endpoint-notification-source
  - type: metrics-data-source
  - type: core-metrics-extractor
  - type: single-profile-handler
  - type: decode-filter
  - type: precise-prefix-cache-producer
    parameters:
      tokenProcessorConfig: {blockSize: 4}
      indexerConfig: {kvBlockIndexConfig: {enableMetrics: true}}
  - type: prefix-cache-scorer
    parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}
  - type: kv-cache-utilization-scorer
  - type: queue-scorer
  - type: max-score-picker
dataLayer:
  sources:
    - pluginRef: metrics-data-source
      extractors: [{pluginRef: core-metrics-extractor}]
    - pluginRef: endpoint-notification-source
      extractors: [{pluginRef: precise-prefix-cache-producer}]
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: decode-filter
      - pluginRef: prefix-cache-scorer
        weight: 2.0
      - pluginRef: kv-cache-utilization-scorer
        weight: 1.0
      - pluginRef: queue-scorer
        weight: 1.0
      - pluginRef: max-score-picker
"""


def test_upstream_split_producer_form_scores_from_the_precise_index() -> None:
    """llm-d's current producer + generic prefix-cache-scorer form reads the precise index."""
    from kvaware_scorer.scheduler import SchedulingRequest

    from .conftest import endpoints

    s = Scheduler.from_config(
        LLMD_SPLIT_FORM, plugin_manager=make_plugin_manager(use_env=False), seed=0
    )
    producer = s.plugin("precise-prefix-cache-producer")
    assert s.event_sinks == [producer]
    eps = endpoints(3)
    prompt = list(range(32))
    keys = producer.indexer.block_keys(prompt, "m")
    producer.indexer.index.add(eps[1].id, keys[:4])
    r = s.schedule(SchedulingRequest("r", "m", token_ids=prompt), eps)
    assert r.scores["prefix-cache-scorer"] == {eps[0].id: 0.0, eps[1].id: 0.5, eps[2].id: 0.0}
    assert r.targets == [eps[1]]
    # the producer's pre-request hook recorded the pick speculatively
    r2 = s.schedule(SchedulingRequest("r2", "m", token_ids=prompt), eps)
    assert r2.scores["prefix-cache-scorer"][eps[1].id] == 1.0
    s.close()


@pytest.mark.parametrize("ref", ["missing", "queue-scorer"])
def test_producer_reference_checked(ref: str) -> None:
    """prefixMatchInfoProducerName must name a configured match-info producer."""
    data = config(
        [
            {"type": "queue-scorer"},
            {"type": "prefix-cache-scorer", "parameters": {"prefixMatchInfoProducerName": ref}},
        ]
    )
    with pytest.raises(ConfigError) as info:
        Scheduler.from_config(data, plugin_manager=make_plugin_manager(use_env=False))
    assert info.value.path == "plugins[1].parameters.prefixMatchInfoProducerName"


@pytest.mark.parametrize(
    ("given", "block_size"),
    [
        ({"blockSize": 0}, 16),
        ({"blockSizeTokens": 0}, 16),
        ({"blockSize": 32, "blockSizeTokens": 64}, 64),
        ({"blockSize": 32, "blockSizeTokens": 0}, 32),
        ({"blockSize": 32}, 32),
    ],
)
def test_token_processor_block_size_as_upstream(given: dict[str, int], block_size: int) -> None:
    """blockSize / blockSizeTokens: 0 means unset (16), blockSizeTokens wins over blockSize."""
    cfg = IndexerConfig.model_validate({"tokenProcessorConfig": given})
    assert cfg.token_processor_config.block_size == block_size


@pytest.mark.parametrize("algo", ["cbor-fnv", "xxh64"])
def test_upstream_hash_one_rule_for_library_and_yaml(algo: str, registry: PluginRegistry) -> None:
    """Upstream-only hashes load under derived keys (library and YAML alike) and are refused
    under vllm keys (library and YAML alike)."""
    tp = {"hashAlgorithm": algo}
    IndexerConfig.model_validate({"tokenProcessorConfig": tp})
    load_config(
        config(
            [{"type": "precise-prefix-cache-scorer", "parameters": {"tokenProcessorConfig": tp}}]
        ),
        registry,
    )
    bad = {**tp, "keyMode": "vllm"}
    with pytest.raises(ConfigError):
        IndexerConfig.model_validate({"tokenProcessorConfig": bad})
    data = config(
        [{"type": "precise-prefix-cache-scorer", "parameters": {"tokenProcessorConfig": bad}}]
    )
    assert paths_of(data, registry) == ["plugins[0].parameters.tokenProcessorConfig"]


def test_legacy_max_prefix_blocks_in_index_config_warns(registry: PluginRegistry) -> None:
    """kvBlockIndexConfig.maxPrefixBlocksToMatch (older configs) loads with a warning."""
    kb = {"maxPrefixBlocksToMatch": 256, "inMemoryConfig": {"size": 1000}}
    cfg = load_config(
        config([{"type": "precise-prefix-cache-scorer", "parameters": {"kvBlockIndexConfig": kb}}]),
        registry,
    )
    assert any("maxPrefixBlocksToMatch" in w for w in cfg.warnings)
    assert IndexerConfig.model_validate({"kvBlockIndexConfig": kb}).kv_block_index_config
