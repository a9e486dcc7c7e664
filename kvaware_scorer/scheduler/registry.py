"""The plugin-type registry: YAML ``type`` -> factory, parameter model, roles and aliases.

Plugin distributions fill a `PluginRegistry` from their `kvaware_register_plugins` hook; the
configuration loader resolves YAML against it and the scheduler builds plugin objects with it.
"""

from __future__ import annotations

import builtins
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.metrics import Metrics

if TYPE_CHECKING:
    from kvaware_scorer.scheduler.types import SchedulerView

__all__ = [
    "CAPABILITIES",
    "KINDS",
    "MATCH_INFO_CONSUMER",
    "MATCH_INFO_PRODUCER",
    "NoParameters",
    "ParamTransform",
    "PluginContext",
    "PluginFactory",
    "PluginRegistry",
    "PluginSpec",
    "TypeAlias",
]

logger = logging.getLogger(__name__)

#: The roles a plugin can play, and the method that marks each.
KINDS: Mapping[str, str] = MappingProxyType(
    {
        "filter": "filter",
        "scorer": "score",
        "picker": "pick",
        "profile-handler": "pick_profiles",
        "pre-request": "pre_request",
        "post-response": "post_response",
        # roles referenced from other plugins' parameters or the upstream top-level sections
        "decider": "disaggregate",
        "parser": "parse",
        "saturation-detector": "saturated",
        "fairness-policy": "pick_flow",
        "ordering-policy": "order_key",
        "usage-limit-policy": "compute_limit",
        "topology-extractor": "topology",
        "admitter": "admit",
    }
)

#: Capability a plugin type declares when its objects produce prefix match info for others.
MATCH_INFO_PRODUCER = "match-info-producer"
#: Capability a plugin type declares when its objects cannot work without prefix match info
#: (upstream declares the data Required): with no producer configured, the loader adds the
#: default producer, as upstream auto-creates it.
MATCH_INFO_CONSUMER = "match-info-consumer"

#: What plugin objects can provide to (or need from) other plugins, and the method that marks
#: each (inferred from the factory when a registration does not declare its capabilities;
#: None: only declared).
CAPABILITIES: Mapping[str, str | None] = MappingProxyType(
    {MATCH_INFO_PRODUCER: "match_info", MATCH_INFO_CONSUMER: None}
)

#: Rewrites raw ``parameters`` before validation; returns the new mapping and warnings.
ParamTransform = Callable[[dict[str, Any]], tuple[dict[str, Any], list[str]]]


class NoParameters(BaseModel):
    """Parameters of a plugin that takes none (any key is an error)."""

    model_config = {"extra": "forbid"}


@dataclass
class PluginContext:
    """What a plugin factory gets besides its parameters.

    Attributes:
        name: The plugin's name in the configuration.
        type: Its YAML type (canonical).
        clock: Monotonic clock in seconds (the emulator passes its virtual clock).
        rng: A random generator seeded from the scheduler's seed and the plugin's name.
        metrics: Shared metrics (the registry the scheduler exposes).
        scheduler: The scheduler being built (set before factories run).
    """

    name: str
    type: str
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    metrics: Metrics = field(default_factory=Metrics)
    scheduler: SchedulerView | None = None


#: ``factory(params, ctx) -> plugin object``; `params` is an instance of the spec's model.
PluginFactory = Callable[[Any, PluginContext], object]


@dataclass(frozen=True)
class PluginSpec:
    """One registered plugin type.

    Attributes:
        type: YAML ``type`` (canonical name).
        factory: Builds the plugin object from validated parameters and a `PluginContext`.
        params: Pydantic model validating ``parameters`` (strict: unknown keys are errors).
        kinds: Roles the objects play (keys of `KINDS`); slotting into profiles uses them.
        description: One line for ``kvaware validate`` and the docs.
        param_aliases: Deprecated parameter name -> current name (accepted with a warning).
        transform: Rewrites raw parameters before validation (upstream-form conversions).
        override: Whether this registration replaces another of the same type.
        source: Module that registered it (for error messages).
        refs: Parameters naming other plugins: dotted field path in the parameter model
            (``deciders.prefill``) -> the role the named plugin must play (None: any). The
            loader checks them like ``pluginRef``s, with the YAML path.
        capabilities: What the objects provide to (or need from) other plugins (keys of
            `CAPABILITIES`).
        inert: The type is accepted for upstream configurations and does nothing here (the
            loader says so); a type without roles that works in the background (a discovery,
            a data source) is not inert.
    """

    type: str
    factory: PluginFactory
    params: builtins.type[BaseModel]
    kinds: frozenset[str]
    description: str = ""
    param_aliases: Mapping[str, str] = field(default_factory=dict)
    transform: ParamTransform | None = None
    override: bool = False
    source: str = ""
    refs: Mapping[str, str | None] = field(default_factory=dict)
    capabilities: frozenset[str] = frozenset()
    inert: bool = False


@dataclass(frozen=True)
class TypeAlias:
    """An old type name that resolves to a current one (with a warning)."""

    old: str
    new: str
    param_aliases: Mapping[str, str] = field(default_factory=dict)
    transform: ParamTransform | None = None


def _infer_kinds(factory: PluginFactory) -> frozenset[str]:
    if not isinstance(factory, type):
        raise ConfigError(
            f"cannot infer the roles of factory {factory!r}; pass kinds=... to register()"
        )
    return frozenset(k for k, method in KINDS.items() if callable(getattr(factory, method, None)))


def _infer_capabilities(factory: PluginFactory) -> frozenset[str]:
    return frozenset(
        c
        for c, method in CAPABILITIES.items()
        if method is not None and callable(getattr(factory, method, None))
    )


def _roles(
    type_name: str,
    factory: PluginFactory,
    kinds: Iterable[str] | None,
    capabilities: Iterable[str] | None,
) -> tuple[frozenset[str], frozenset[str]]:
    """The kinds and capabilities of a registration (inferred from `factory` when None)."""
    kind_set = frozenset(kinds) if kinds is not None else _infer_kinds(factory)
    unknown = kind_set - set(KINDS)
    if unknown:
        raise ConfigError(
            f"unknown plugin kinds {sorted(unknown)} for type {type_name!r}; valid: {sorted(KINDS)}"
        )
    caps = frozenset(capabilities) if capabilities is not None else _infer_capabilities(factory)
    if caps - set(CAPABILITIES):
        raise ConfigError(
            f"unknown capabilities {sorted(caps - set(CAPABILITIES))} for type "
            f"{type_name!r}; valid: {sorted(CAPABILITIES)}"
        )
    return kind_set, caps


class PluginRegistry:
    """YAML plugin types known to a scheduler (filled by `kvaware_register_plugins` hooks).

    Attributes:
        default_producer: Name of the match-info producer a consumer naming none reads when
            it is configured (upstream's auto-created default producer), declared by the
            distribution that provides it with `set_default_producer`; None: no such default.
    """

    def __init__(self) -> None:
        self._specs: dict[str, PluginSpec] = {}
        self._aliases: dict[str, TypeAlias] = {}
        self.default_producer: str | None = None

    def set_default_producer(self, name: str) -> None:
        """Declare the plugin name a match-info consumer that names no producer reads when a
        plugin of that name is configured (and, when several producers make the choice
        ambiguous, the name the loader adds a plugin of that type under)."""
        self.default_producer = name

    def register(
        self,
        type_name: str,
        factory: PluginFactory,
        *,
        params: type[BaseModel] | None = None,
        kinds: Iterable[str] | None = None,
        description: str = "",
        param_aliases: Mapping[str, str] | None = None,
        transform: ParamTransform | None = None,
        override: bool = False,
        refs: Mapping[str, str | None] | None = None,
        capabilities: Iterable[str] | None = None,
        inert: bool = False,
    ) -> None:
        """Register a plugin type.

        Args:
            type_name: The YAML ``type``.
            factory: ``factory(params, ctx)`` building the plugin object (often the class).
            params: Parameter model (None: the type takes no parameters).
            kinds: Roles (``filter``, ``scorer``, ``picker``, ``profile-handler``,
                ``pre-request``, ``post-response``); inferred from the class's methods when
                `factory` is a class and `kinds` is None.
            description: One-line summary.
            param_aliases: Deprecated parameter name -> current name.
            transform: Rewrites raw parameters before validation.
            override: Replace an existing registration of `type_name`. A registration made
                with ``override=True`` also wins over later plain ones.
            refs: Parameters naming other plugins (dotted field path -> required role or
                None); checked by the configuration loader.
            capabilities: What the objects provide to or need from other plugins
                (``match-info-producer``, ``match-info-consumer``); inferred from the
                factory's methods (`CAPABILITIES`) when None.
            inert: Accepted for upstream configurations, does nothing here (warned about).

        Raises:
            ConfigError: The type is registered twice without ``override``, or a kind or a
                capability is unknown.
        """
        kind_set, caps = _roles(type_name, factory, kinds, capabilities)
        self._add(
            PluginSpec(
                type=type_name,
                factory=factory,
                params=params or NoParameters,
                kinds=kind_set,
                description=description,
                param_aliases=dict(param_aliases or {}),
                transform=transform,
                override=override,
                source=getattr(factory, "__module__", "") or "",
                refs=dict(refs or {}),
                capabilities=caps,
                inert=inert,
            )
        )

    def _add(self, spec: PluginSpec) -> None:
        """Store `spec`, unless a registration made with ``override=True`` holds its type."""
        type_name, source = spec.type, spec.source
        existing = self._specs.get(type_name)
        if existing is not None:
            if existing.override and not spec.override:
                logger.info(
                    "plugin type %r from %s kept (overrides %s)",
                    type_name,
                    existing.source,
                    source,
                )
                return
            if not spec.override:
                raise ConfigError(
                    f"plugin type {type_name!r} registered twice (by {existing.source} and "
                    f"{source}); pass override=True to replace it"
                )
        if type_name in self._aliases:
            raise ConfigError(f"plugin type {type_name!r} is already an alias")
        self._specs[type_name] = spec

    def register_alias(
        self,
        old: str,
        new: str,
        *,
        param_aliases: Mapping[str, str] | None = None,
        transform: ParamTransform | None = None,
    ) -> None:
        """Accept `old` as a deprecated name of type `new` (a warning names the new one).

        Args:
            old: The old type name.
            new: The current type name (need not be registered yet).
            param_aliases: Extra parameter renames that apply only under the old name.
            transform: Parameter rewrite that applies only under the old name.
        """
        if old in self._specs:
            raise ConfigError(f"cannot alias {old!r}: it is a registered type")
        self._aliases[old] = TypeAlias(old, new, dict(param_aliases or {}), transform)

    def resolve(self, type_name: str) -> tuple[PluginSpec, TypeAlias | None]:
        """The spec of `type_name` (following an alias) and the alias used, if any.

        Raises:
            ConfigError: Unknown type (the message lists the known ones).
        """
        alias = self._aliases.get(type_name)
        target = alias.new if alias is not None else type_name
        spec = self._specs.get(target)
        if spec is None:
            raise ConfigError(
                f"unknown plugin type {type_name!r}; known types: {', '.join(self.types())}"
            )
        return spec, alias

    def get(self, type_name: str) -> PluginSpec | None:
        """The spec registered under `type_name` (no alias resolution)."""
        return self._specs.get(type_name)

    def types(self) -> list[str]:
        """Registered type names, sorted."""
        return sorted(self._specs)

    def aliases(self) -> dict[str, str]:
        """Old type name -> current type name."""
        return {a.old: a.new for a in self._aliases.values()}

    def specs(self) -> list[PluginSpec]:
        """Every registered spec, sorted by type."""
        return [self._specs[t] for t in self.types()]

    def __contains__(self, type_name: object) -> bool:
        return type_name in self._specs or type_name in self._aliases
