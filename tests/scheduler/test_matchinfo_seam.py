"""Match-info producers and the default producer are declared by plugin distributions through
the registry: the core names no concrete plugin type."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler import (
    Endpoint,
    PluginContext,
    PluginRegistry,
    SchedulingContext,
    SchedulingRequest,
    load_config,
    matchinfo,
)
from kvaware_scorer.scheduler.registry import MATCH_INFO_PRODUCER


class Producer:
    """A third-party producer: its objects have `match_info`."""

    def __init__(self, params: BaseModel, ctx: PluginContext) -> None:
        self.name = ctx.name

    def score(self, ctx: SchedulingContext, request: SchedulingRequest, eps: Sequence[Endpoint]):
        return {}

    def match_info(self, ctx: Any, request: Any, eps: Any) -> matchinfo.MatchInfo:
        return {}, 0, 16


class ConsumerParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    prefix_match_info_producer_name: str | None = None


class Consumer:
    def __init__(self, params: ConsumerParams, ctx: PluginContext) -> None:
        self.name = ctx.name

    def score(self, ctx: SchedulingContext, request: SchedulingRequest, eps: Sequence[Endpoint]):
        return {}


class Picker:
    def __init__(self, params: BaseModel, ctx: PluginContext) -> None:
        pass

    def pick(self, ctx: Any, request: Any, scored: Any) -> list[Endpoint]:
        return [s.endpoint for s in scored[:1]]


class Handler:
    def __init__(self, params: BaseModel, ctx: PluginContext) -> None:
        pass

    def pick_profiles(self, ctx: Any, request: Any, profiles: Any, results: Any) -> list[str]:
        return [] if results else list(profiles)[:1]

    def process_results(self, ctx: Any, request: Any, results: Any) -> str:
        return str(next(iter(results)))


def _registry(default: str | None) -> PluginRegistry:
    reg = PluginRegistry()
    reg.register("my-producer", Producer)
    reg.register("my-consumer", Consumer, params=ConsumerParams)
    reg.register("max-score-picker", Picker)
    reg.register("single-profile-handler", Handler)
    if default is not None:
        reg.set_default_producer(default)
    return reg


def _config(*plugins: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "llm-d.ai/v1alpha1",
        "kind": "EndpointPickerConfig",
        "plugins": list(plugins),
    }


def test_producer_capability_is_inferred_or_declared() -> None:
    reg = _registry(None)
    assert reg.get("my-producer").capabilities == {MATCH_INFO_PRODUCER}  # type: ignore[union-attr]
    assert reg.get("my-consumer").capabilities == frozenset()  # type: ignore[union-attr]
    # a factory function has no match_info to infer from: it declares the capability
    reg.register(
        "fn-producer",
        lambda params, ctx: Producer(params, ctx),
        kinds=("scorer",),
        capabilities=(MATCH_INFO_PRODUCER,),
    )
    cfg = load_config(_config({"type": "fn-producer", "name": "fp"}), reg)
    assert matchinfo.match_sources(cfg) == {"fp": "fp"}
    with pytest.raises(ConfigError, match="unknown capabilities"):
        reg.register("bad", Producer, capabilities=("teleport",))


def test_default_producer_name_comes_from_the_registry() -> None:
    plugins = (
        {"type": "my-producer", "name": "house-default"},
        {"type": "my-producer", "name": "other"},
        {"type": "my-consumer", "name": "reader"},
    )
    cfg = load_config(_config(*plugins), _registry("house-default"))
    assert cfg.default_producer == "house-default"
    # several producers: the consumer that names none is bound to the declared default
    assert cfg.plugins["reader"].params.prefix_match_info_producer_name == "house-default"
    assert any("'house-default', upstream's default producer" in w for w in cfg.warnings)
    objs = {
        "house-default": Producer(ConsumerParams(), PluginContext("house-default", "my-producer"))
    }
    assert matchinfo.find_prefix_source(objs, cfg, None, "x") is objs["house-default"]

    # no declared default: nothing is bound, and the consumer must name a producer
    cfg = load_config(_config(*plugins), _registry(None))
    assert cfg.default_producer is None
    assert cfg.plugins["reader"].params.prefix_match_info_producer_name is None
    with pytest.raises(ConfigError, match="several prefix match-info producers"):
        matchinfo.default_source(cfg, "reader")


def test_builtins_declare_upstreams_default_producer(registry: PluginRegistry) -> None:
    assert registry.default_producer == "approx-prefix-cache-producer"
    assert MATCH_INFO_PRODUCER in registry.resolve("prefix-cache-scorer")[0].capabilities


def test_old_default_producer_import_still_works() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from kvaware_scorer.scheduler.matchinfo import DEFAULT_PRODUCER
    assert DEFAULT_PRODUCER == "approx-prefix-cache-producer"
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
