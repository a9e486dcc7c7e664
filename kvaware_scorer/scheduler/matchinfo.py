"""Prefix match info shared between plugins: the producer Protocol, who reads whose match info,
and a per-call memo so a request's index lookup runs once per scheduling call.

Upstream splits prefix affinity into producers (``precise-prefix-cache-producer``,
``approx-prefix-cache-producer``) that write ``PrefixCacheMatchInfo{matchBlocks, totalBlocks,
blockSizeTokens}`` per endpoint and consumers that read it (``prefix-cache-scorer``,
``no-hit-lru-scorer``). Here a *producer* is a plugin type with the ``match-info-producer``
capability (`kvaware_scorer.scheduler.registry.MATCH_INFO_PRODUCER`: declared at registration,
or inferred when its objects have `match_info`, see `MatchInfoProducer`); a *consumer* is a
scorer whose parameters have ``prefixMatchInfoProducerName`` (field
``prefix_match_info_producer_name``). A consumer without that name reads the default producer
when one is configured under its name (as upstream reads its auto-created default producer; the
name is declared by a plugin distribution with `PluginRegistry.set_default_producer`), a
producer-consumer (``prefix-cache-scorer``) otherwise reads itself, and a pure consumer the one
prefix plugin configured. The core knows no concrete plugin type.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler.registry import MATCH_INFO_PRODUCER
from kvaware_scorer.scheduler.types import (
    ConfiguredPlugin,
    Endpoint,
    ResolvedConfig,
    SchedulingContext,
    SchedulingRequest,
)

__all__ = [
    "PRODUCER_PARAM",
    "MatchInfo",
    "MatchInfoProducer",
    "check_references",
    "default_source",
    "find_prefix_source",
    "match_sources",
    "per_call",
    "producer",
]

logger = logging.getLogger(__name__)

#: (endpoint id -> matched blocks (tier-weighted), total blocks, block size in tokens); endpoints
#: without a match are left out.
MatchInfo = tuple[dict[str, float], int, int]

#: Parameter field naming the producer a consumer reads.
PRODUCER_PARAM = "prefix_match_info_producer_name"

T = TypeVar("T")


@runtime_checkable
class MatchInfoProducer(Protocol):
    """A plugin that knows how much of a request's prefix each candidate holds."""

    def match_info(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> MatchInfo:
        """Match info of `request` for `endpoints` (see `MatchInfo`).

        Raises:
            KVAwareError: The request could not be tokenized.
        """
        ...


def per_call(
    request: SchedulingRequest,
    key: str,
    ctx: SchedulingContext,
    endpoints: Sequence[Endpoint],
    compute: Callable[[], T],
) -> T:
    """``compute()``, memoized on the request for this scheduling call and candidate list.

    Every plugin of a profile gets the same `ctx` and candidate list in one call, so a scorer
    and another plugin reading the same producer share one index lookup. A new call (another
    `ctx`, e.g. a retry on fewer endpoints) computes afresh.
    """
    memo = request.state.get(key)
    if memo is not None and memo[0] is ctx and memo[1] is endpoints:
        value: T = memo[2]
        return value
    value = compute()
    # NOTE: holding `ctx` and `endpoints` keeps their ids from being reused while memoized.
    request.state[key] = (ctx, endpoints, value)
    return value


def __getattr__(name: str) -> Any:
    # NOTE: `DEFAULT_PRODUCER` moved to the built-in plugins, which declare it through the
    # registry; the old import path keeps working, with a warning.
    if name == "DEFAULT_PRODUCER":
        import importlib
        import warnings

        warnings.warn(
            "kvaware_scorer.scheduler.matchinfo.DEFAULT_PRODUCER moved: read "
            "SchedulerConfig.default_producer (or kvaware_scorer.plugins.compat.DEFAULT_PRODUCER)",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module("kvaware_scorer.plugins.compat").DEFAULT_PRODUCER
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_producer(p: ConfiguredPlugin) -> bool:
    return MATCH_INFO_PRODUCER in p.capabilities


def _consumes(p: ConfiguredPlugin) -> bool:
    return "scorer" in p.kinds and hasattr(p.params, PRODUCER_PARAM)


def _named(p: ConfiguredPlugin) -> str | None:
    value = getattr(p.params, PRODUCER_PARAM, None) if _consumes(p) else None
    return str(value) if value else None


def _default(config: ResolvedConfig) -> str | None:
    name = config.default_producer
    p = config.plugins.get(name) if name is not None else None
    return name if p is not None and _is_producer(p) else None


def match_sources(config: ResolvedConfig) -> dict[str, str]:
    """Producer plugin name -> name of the plugin whose match info it scores from (itself, or
    the producer it reads)."""
    out: dict[str, str] = {}
    default = _default(config)
    for name, p in config.plugins.items():
        if not _is_producer(p):
            continue
        named = _named(p)
        if named is None and _consumes(p) and default not in (None, name):
            named = default
        out[name] = named or name
    return out


def default_source(config: ResolvedConfig, consumer: str) -> str | None:
    """The producer a pure consumer without ``prefixMatchInfoProducerName`` reads: the one
    source of every prefix plugin configured, or None when there is none.

    Raises:
        ConfigError: Several distinct sources (the consumer must name one).
    """
    sources = sorted(set(match_sources(config).values()))
    if len(sources) > 1:
        raise ConfigError(
            f"several prefix match-info producers ({', '.join(sources)}); name one with "
            "prefixMatchInfoProducerName",
            f"{config.plugins[consumer].path}.parameters",
        )
    return sources[0] if sources else None


def check_references(config: ResolvedConfig) -> None:
    """Every ``prefixMatchInfoProducerName`` names a configured producer, and a pure consumer
    without one has an unambiguous default (without any, a warning says every request reads as
    a miss).

    Raises:
        ConfigError: A dangling, wrong-typed or ambiguous reference (with its YAML path).
    """
    for name, p in config.plugins.items():
        if not _consumes(p):
            continue
        target_name = _named(p)
        if target_name is None:
            if not _is_producer(p) and default_source(config, name) is None:
                text = (
                    f"{p.path}: {name!r} finds no prefix-cache plugin to read: every request "
                    "counts as a miss (add prefix-cache-scorer or precise-prefix-cache-scorer)"
                )
                config.warnings.append(text)
                logger.warning("%s", text)
            continue
        if target_name == name:
            continue
        target = config.plugins.get(target_name)
        path = f"{p.path}.parameters.prefixMatchInfoProducerName"
        if target is None:
            raise ConfigError(f"names no plugin in plugins[]: {target_name!r}", path)
        if not _is_producer(target):
            producers = sorted(n for n, q in config.plugins.items() if _is_producer(q))
            raise ConfigError(
                f"{target_name!r} is a {target.type!r}, not a prefix match-info producer "
                f"(configured producers: {', '.join(producers) or 'none'})",
                path,
            )


def producer(plugins: Mapping[str, object], name: str, consumer: str) -> MatchInfoProducer:
    """The plugin object `name`, checked to produce match info.

    Raises:
        ConfigError: No such plugin, or it has no `match_info`.
    """
    obj = plugins.get(name)
    if not isinstance(obj, MatchInfoProducer):
        raise ConfigError(
            f"{consumer}: {name!r} is not a configured prefix match-info producer",
            "prefixMatchInfoProducerName",
        )
    return obj


def find_prefix_source(
    plugins: Mapping[str, object], config: ResolvedConfig, name: str | None, consumer: str
) -> MatchInfoProducer | None:
    """The prefix plugin a consumer that is no scorer (a decider, a latency predictor) reads:
    `name`, else the default producer when configured (`ResolvedConfig.default_producer`,
    upstream's default producer), else the one prefix plugin configured; None (with a warning)
    when none is.

    Raises:
        ConfigError: `name` is no configured prefix match-info producer.
    """
    default = config.default_producer
    if not name and default is not None and default in plugins:
        name = default
    if not name:
        sources = sorted(set(match_sources(config).values()))
        name = sources[0] if len(sources) == 1 else None
    if not name:
        logger.warning("%s: no prefix plugin to read; every prompt counts as uncached", consumer)
        return None
    return producer(plugins, name, consumer)
