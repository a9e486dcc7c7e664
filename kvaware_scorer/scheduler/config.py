"""EndpointPickerConfig loading: strict validation, upstream defaults, aliases, resolved profiles.

The format is the upstream one (``apiVersion: llm-d.ai/v1alpha1`` or the deprecated
``inference.networking.x-k8s.io/v1alpha1``, ``kind: EndpointPickerConfig``, ``plugins[]`` of
``{type, name?, parameters?}``, ``schedulingProfiles[]`` of ``{name, plugins: [{pluginRef,
weight?}]}``). Resolution applies the upstream defaults:

* a plugin's name defaults to its ``type`` (as written), a scorer's weight to 1.0;
* no ``schedulingProfiles`` -> one profile ``default`` with every filter, scorer and picker in
  ``plugins[]`` order;
* no profile handler -> ``single-profile-handler`` is added (one profile only);
* a profile without a picker gets the one configured picker, else ``max-score-picker``.

Everything else is strict: unknown keys, unknown types, duplicate names, bad parameters and
dangling references are errors naming the YAML path (``plugins[2].parameters.blockSize``).
Renamed upstream types and parameters are accepted with a warning. The upstream top-level
sections this host does not implement (``featureGates``, ``dataLayer``, ``flowControl``,
``requestHandler``, ``saturationDetector``, ``parser``) are shape-checked, kept in
``SchedulerConfig.ignored`` and reported as ignored.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from kvaware_scorer.configio import (
    errors_of,
    join_path,
    load_yaml,
    parse_duration,
    read_yaml,
    unknown_key,
    validation_errors,
)
from kvaware_scorer.errors import ConfigError, ConfigErrorGroup
from kvaware_scorer.scheduler.matchinfo import DEFAULT_PRODUCER, PRODUCER_PARAM
from kvaware_scorer.scheduler.registry import NoParameters, PluginRegistry, PluginSpec

__all__ = [
    "API_VERSION",
    "DEFAULT_WEIGHT",
    "DEPRECATED_API_VERSION",
    "KIND",
    "ConfigErrorGroup",
    "PluginConfig",
    "ProfileConfig",
    "SchedulerConfig",
    "ScorerRef",
    "load_config",
    "parse_duration",
    "read_yaml",
]

logger = logging.getLogger(__name__)

API_VERSION = "llm-d.ai/v1alpha1"
DEPRECATED_API_VERSION = "inference.networking.x-k8s.io/v1alpha1"
KIND = "EndpointPickerConfig"
DEFAULT_WEIGHT = 1.0
DEFAULT_PROFILE = "default"
DEFAULT_HANDLER = "single-profile-handler"
DEFAULT_PICKER = "max-score-picker"

_PROFILE_SLOTS = ("filter", "scorer", "picker")
_IGNORED_SECTIONS = (
    "featureGates",
    "dataLayer",
    "flowControl",
    "requestHandler",
    "saturationDetector",
    "parser",
)
#: Sections that configure flow control (`kvaware_scorer.scheduler.flowcontrol`): used, kept
#: in `SchedulerConfig.ignored` for its builder.
_FLOW_SECTIONS = ("flowControl", "saturationDetector")
_TOP_KEYS = ("apiVersion", "kind", "plugins", "schedulingProfiles", *_IGNORED_SECTIONS)


# -- resolved model ------------------------------------------------------------------------------


@dataclass
class PluginConfig:
    """One configured plugin after validation.

    Attributes:
        name: Its name (defaults to the type as written).
        type: Canonical type.
        written_type: The type as written (differs when an alias was used).
        params: Validated parameters (an instance of the spec's model).
        spec: The registered spec.
        path: YAML path of its entry (``plugins[3]``), or ``(injected)``.
        injected: Added by the defaults, not written in the YAML.
    """

    name: str
    type: str
    written_type: str
    params: BaseModel
    spec: PluginSpec
    path: str
    injected: bool = False

    @property
    def kinds(self) -> frozenset[str]:
        """Roles of the plugin."""
        return self.spec.kinds

    def parameters(self) -> dict[str, Any]:
        """Parameters with every default, in the YAML (camelCase) form."""
        dumped: dict[str, Any] = self.params.model_dump(mode="json", by_alias=True)
        return dumped


@dataclass(frozen=True)
class ScorerRef:
    """A scorer in a profile and its weight."""

    name: str
    weight: float


@dataclass
class ProfileConfig:
    """One resolved scheduling profile.

    Attributes:
        name: Profile name.
        filters: Filter plugin names, in order.
        scorers: Scorers and weights.
        picker: Picker plugin name.
        path: YAML path of the profile (``schedulingProfiles[0]``) or ``(default)``.
    """

    name: str
    filters: list[str] = field(default_factory=list)
    scorers: list[ScorerRef] = field(default_factory=list)
    picker: str = ""
    path: str = ""


@dataclass
class SchedulerConfig:
    """A validated EndpointPickerConfig with every default applied.

    Attributes:
        api_version: The ``apiVersion`` given.
        plugins: Plugins by name, in YAML order (injected ones last).
        profiles: Profiles by name.
        profile_handler: Name of the profile-handler plugin.
        ignored: Upstream top-level sections accepted but not implemented here.
        warnings: Every warning issued while loading (aliases, ignored parts, unused plugins).
    """

    api_version: str
    plugins: dict[str, PluginConfig]
    profiles: dict[str, ProfileConfig]
    profile_handler: str
    ignored: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as an EndpointPickerConfig mapping (loads back as is)."""
        out: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND, "plugins": []}
        for p in self.plugins.values():
            entry: dict[str, Any] = {"type": p.type, "name": p.name}
            params = p.parameters()
            if params:
                entry["parameters"] = params
            out["plugins"].append(entry)
        out["schedulingProfiles"] = [
            {"name": prof.name, "plugins": _profile_refs(prof)} for prof in self.profiles.values()
        ]
        # NOTE: the upstream sections as given (flow control is configured there).
        out.update(self.ignored)
        return out

    def describe(self) -> str:
        """Human-readable summary: profiles (filters, weighted scorers, picker), plugins with
        every parameter (defaults included), ignored sections and warnings."""
        lines = [f"apiVersion: {self.api_version}"]
        handler = self.plugins[self.profile_handler]
        lines.append(
            f"profile handler: {handler.name} ({handler.type})"
            + (" [injected]" if handler.injected else "")
        )
        for prof in self.profiles.values():
            lines.append(f"profile {prof.name}:")
            lines.append(f"  filters: {', '.join(prof.filters) if prof.filters else '(none)'}")
            lines.append("  scorers:" + ("" if prof.scorers else " (none)"))
            for s in prof.scorers:
                lines.append(f"    {s.name:<36} weight {s.weight:g}")
            picker = self.plugins[prof.picker]
            lines.append(f"  picker: {picker.name}" + (" [injected]" if picker.injected else ""))
        lines.append("plugins:")
        for p in self.plugins.values():
            alias = f", written as {p.written_type}" if p.written_type != p.type else ""
            roles = ", ".join(sorted(p.kinds)) or "inert"
            lines.append(f"  {p.name} (type {p.type}{alias}; {roles})")
            params = p.parameters()
            if params:
                dumped = yaml.safe_dump(params, sort_keys=False, default_flow_style=False)
                lines.extend("      " + line for line in dumped.rstrip().splitlines())
        if self.ignored:
            lines.append(f"ignored sections: {', '.join(self.ignored)}")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)


def _profile_refs(prof: ProfileConfig) -> list[dict[str, Any]]:
    """A profile's ``plugins`` list; a plugin that is a filter and a scorer is listed once (it
    plays both roles), with its weight."""
    weights = {s.name: s.weight for s in prof.scorers}
    refs: list[dict[str, Any]] = []
    for f in prof.filters:
        refs.append(
            {"pluginRef": f, "weight": weights.pop(f)} if f in weights else {"pluginRef": f}
        )
    refs += [{"pluginRef": name, "weight": w} for name, w in weights.items()]
    return [*refs, {"pluginRef": prof.picker}]


# -- shape models of the ignored upstream sections ------------------------------------------------


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _PluginRef(_Shape):
    pluginRef: str


class _Source(_Shape):
    pluginRef: str
    extractors: list[_PluginRef] = []


class _DataLayer(_Shape):
    sources: list[_Source] = []
    discovery: _PluginRef | None = None
    peerDiscovery: dict[str, Any] | None = None
    crossReplicaSyncerPluginRef: str | None = None
    crossReplicaSyncInterval: str | float | None = None
    injectDefaults: bool | None = None


class _RequestHandler(_Shape):
    parsers: list[_PluginRef] = []


class _Parser(_Shape):
    pluginRef: str


class _SaturationRef(_Shape):
    pluginRef: str


class _LegacySaturation(_Shape):
    """The older GIE form: thresholds given inline (no plugin)."""

    queueDepthThreshold: int | None = None
    kvCacheUtilThreshold: float | None = None
    metricsStalenessThreshold: str | float | None = None


class _PriorityBand(_Shape):
    priority: int = 0
    priorityName: str | None = None
    maxBytes: int | str | None = None
    maxRequests: int | str | None = None
    fairnessPolicyRef: str | None = None
    orderingPolicyRef: str | None = None


class _FlowControl(_Shape):
    maxBytes: int | str | None = None
    maxRequests: int | str | None = None
    defaultRequestTTL: str | float | None = None
    noEndpointRequestTTL: str | float | None = None
    defaultPriorityBand: _PriorityBand | None = None
    defaultNegativePriorityBand: _PriorityBand | None = None
    priorityBands: list[_PriorityBand] = []
    usageLimitPolicyPluginRef: str | None = None
    saturationDetector: _SaturationRef | None = None
    enableEviction: bool | None = None


#: Feature gates upstream registers (``RegisterFeatureGate``); others are errors, as upstream.
KNOWN_FEATURE_GATES = frozenset(
    {
        "flowControl",
        "haPopulateNonLeaderDatastore",
        "dataLayer",
        "prepareDataPlugins",
        "enableLegacyMetrics",
        "experimentalPlugins",
        "multicluster",
    }
)

#: (section, reference) -> the role the referenced plugin must play.
_REF_ROLES = {
    "saturationDetector": "saturation-detector",
    "fairnessPolicyRef": "fairness-policy",
    "orderingPolicyRef": "ordering-policy",
    "parser": "parser",
}


_FEATURE_GATE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*(=(true|false))?$")


def _refs(model: BaseModel) -> list[str]:
    """Every ``pluginRef`` inside a shape model."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, _PluginRef | _Source | _Parser):
            found.append(value.pluginRef)
        if isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(model)
    return found


def _section_refs(key: str, parsed: BaseModel) -> list[tuple[str, str | None, str]]:
    """(plugin name, required role or None, YAML path) of every reference in a section."""
    if isinstance(parsed, _FlowControl):
        out: list[tuple[str, str | None, str]] = []
        if parsed.saturationDetector is not None:
            out.append(
                (
                    parsed.saturationDetector.pluginRef,
                    _REF_ROLES["saturationDetector"],
                    f"{key}.saturationDetector.pluginRef",
                )
            )
        if parsed.usageLimitPolicyPluginRef:
            out.append((parsed.usageLimitPolicyPluginRef, None, f"{key}.usageLimitPolicyPluginRef"))
        bands = [(f"{key}.priorityBands[{i}]", b) for i, b in enumerate(parsed.priorityBands)] + [
            (f"{key}.{n}", b)
            for n, b in (
                ("defaultPriorityBand", parsed.defaultPriorityBand),
                ("defaultNegativePriorityBand", parsed.defaultNegativePriorityBand),
            )
            if b is not None
        ]
        for where, band in bands:
            for field_name in ("fairnessPolicyRef", "orderingPolicyRef"):
                ref = getattr(band, field_name)
                if ref:
                    out.append((ref, _REF_ROLES[field_name], f"{where}.{field_name}"))
        return out
    if isinstance(parsed, _SaturationRef):
        return [(parsed.pluginRef, _REF_ROLES["saturationDetector"], f"{key}.pluginRef")]
    if isinstance(parsed, _RequestHandler):
        return [
            (p.pluginRef, _REF_ROLES["parser"], f"{key}.parsers[{i}].pluginRef")
            for i, p in enumerate(parsed.parsers)
        ]
    if isinstance(parsed, _Parser):
        return [(parsed.pluginRef, _REF_ROLES["parser"], f"{key}.pluginRef")]
    return [(ref, None, key) for ref in _refs(parsed)]


def _unset(value: Any) -> bool:
    """Whether `value` is a Go zero value (upstream reads it as not given)."""
    return value is None or (not isinstance(value, bool) and value in (0, ""))


def _default_plugins() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Upstream's default configuration (``loadDefaultConfig``): plugins and profiles."""
    weights = {"queue-scorer": 2, "kv-cache-utilization-scorer": 2, "prefix-cache-scorer": 3}
    plugins = [{"type": t} for t in weights]
    refs = [{"pluginRef": t, "weight": w} for t, w in weights.items()]
    return plugins, [{"name": DEFAULT_PROFILE, "plugins": refs}]


# -- the loader ----------------------------------------------------------------------------------


class _Loader:
    """One resolution pass; collects every error before raising."""

    def __init__(self, registry: PluginRegistry) -> None:
        self.registry = registry
        self.errors: list[ConfigError] = []
        self.warnings: list[str] = []
        self.failed: set[str] = set()  # names of plugin entries that failed validation

    def error(self, message: str, path: str | None) -> None:
        self.errors.append(ConfigError(message, path))

    def warn(self, message: str, path: str | None = None) -> None:
        text = f"{path}: {message}" if path else message
        self.warnings.append(text)
        logger.warning("%s", text)

    # -- top level --------------------------------------------------------------------------

    def load(self, data: Any) -> SchedulerConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping at the top level, got {type(data).__name__}")
        for key in data:
            if key not in _TOP_KEYS:
                self.error(unknown_key(key, _TOP_KEYS), str(key))
        api = data.get("apiVersion")
        if api is None:
            self.error(f"missing (use {API_VERSION!r})", "apiVersion")
            api = API_VERSION
        elif api == DEPRECATED_API_VERSION:
            self.warn(
                f"DEPRECATION: apiVersion {DEPRECATED_API_VERSION}/{KIND} is deprecated; "
                f"use {API_VERSION}",
                "apiVersion",
            )
        elif api != API_VERSION:
            self.error(
                f"unsupported apiVersion {api!r} (use {API_VERSION!r} or "
                f"{DEPRECATED_API_VERSION!r})",
                "apiVersion",
            )
        kind = data.get("kind")
        if kind != KIND:
            self.error(f"must be {KIND!r}, got {kind!r}", "kind")
        raw_plugins, raw_profiles = data.get("plugins"), data.get("schedulingProfiles")
        if not raw_plugins and raw_profiles is None:
            # NOTE: upstream runs its default configuration when none is given; so does an
            # EndpointPickerConfig that lists no plugins here.
            self.warn(
                "no plugins: using upstream's default profile (queue-scorer 2, "
                "kv-cache-utilization-scorer 2, prefix-cache-scorer 3)",
                "plugins",
            )
            raw_plugins, raw_profiles = _default_plugins()
        plugins = self.plugins(raw_plugins)
        self.bind_default_producer(plugins)
        self.check_producer_loops(plugins)
        self.check_param_refs(plugins)
        ignored = self.ignored_sections(data, plugins)
        profiles = self.profiles(raw_profiles, plugins)
        handler = self.profile_handler(plugins, profiles)
        if not self.errors:
            self.inject_pickers(plugins, profiles)
            self.warn_unused(plugins, profiles, handler)
        if self.errors:
            raise ConfigErrorGroup(self.errors)
        return SchedulerConfig(
            api_version=str(api),
            plugins=plugins,
            profiles=profiles,
            profile_handler=handler,
            ignored=ignored,
            warnings=self.warnings,
        )

    # -- plugins[] --------------------------------------------------------------------------

    def plugins(self, raw: Any) -> dict[str, PluginConfig]:
        out: dict[str, PluginConfig] = {}
        if raw is None:
            self.error("missing (a list of {type, name?, parameters?})", "plugins")
            return out
        if not isinstance(raw, list):
            self.error(f"expected a list, got {type(raw).__name__}", "plugins")
            return out
        for i, entry in enumerate(raw):
            path = f"plugins[{i}]"
            plugin = self.plugin(entry, path)
            if plugin is None:
                continue
            if plugin.name in out:
                first = out[plugin.name].path
                self.error(f"duplicate plugin name {plugin.name!r} (first at {first})", path)
                continue
            out[plugin.name] = plugin
        return out

    def plugin(self, entry: Any, path: str) -> PluginConfig | None:
        if not isinstance(entry, Mapping):
            self.error(f"expected a mapping {{type, name?, parameters?}}, got {entry!r}", path)
            return None
        bad = [k for k in entry if k not in ("type", "name", "parameters")]
        for k in bad:
            self.error(unknown_key(k, ("type", "name", "parameters")), f"{path}.{k}")
        written = entry.get("type")
        if not isinstance(written, str) or not written:
            self.error("missing or not a string", f"{path}.type")
            return None
        name = entry.get("name", written)
        if not isinstance(name, str) or not name:
            self.error("must be a non-empty string", f"{path}.name")
            return None
        n_errors = len(self.errors)
        plugin = self._plugin(entry, path, written, name)
        if plugin is None or len(self.errors) > n_errors:
            self.failed.add(name)
            return None
        return plugin

    def _plugin(
        self, entry: Mapping[str, Any], path: str, written: str, name: str
    ) -> PluginConfig | None:
        try:
            spec, alias = self.registry.resolve(written)
        except ConfigError as exc:
            self.error(exc.message, f"{path}.type")
            return None
        raw_params = entry.get("parameters")
        if raw_params is None:
            raw_params = {}
        if not isinstance(raw_params, Mapping):
            self.error(f"expected a mapping, got {type(raw_params).__name__}", f"{path}.parameters")
            return None
        params_path = f"{path}.parameters"
        params = dict(raw_params)
        if alias is not None:
            self.warn(f"plugin type {alias.old!r} is deprecated; use {alias.new!r}", f"{path}.type")
            params = self.rename(params, alias.param_aliases, params_path)
            params = self.transform(params, alias.transform, params_path)
        if spec.params is NoParameters and params:
            # NOTE: upstream's factories of parameterless types never decode `parameters`.
            self.warn(
                f"plugin type {spec.type!r} takes no parameters; "
                f"{', '.join(map(str, params))} ignored (as upstream)",
                params_path,
            )
            params = {}
        n_errors = len(self.errors)
        params = self.rename(params, spec.param_aliases, params_path)
        params = self.transform(params, spec.transform, params_path)
        if len(self.errors) > n_errors:
            return None
        try:
            model = spec.params.model_validate(params)
        except ValidationError as exc:
            for err in validation_errors(exc, spec.params, params_path):
                self.error(err.message, err.path)
            return None
        except ConfigError as exc:
            for err in errors_of(exc):
                self.error(
                    err.message, join_path(params_path, err.path) if err.path else params_path
                )
            return None
        if not spec.kinds:
            self.warn(
                f"plugin type {spec.type!r} is accepted for compatibility with upstream "
                "configs and does nothing here",
                path,
            )
        return PluginConfig(name, spec.type, written, model, spec, path)

    def rename(
        self, params: dict[str, Any], aliases: Mapping[str, str], path: str
    ) -> dict[str, Any]:
        for old, new in aliases.items():
            if old not in params:
                continue
            if new in params or _unset(params[old]):
                # NOTE: as upstream: the current name wins, and a Go zero value means unset.
                why = f"{new!r} is given" if new in params else "its value means unset"
                self.warn(f"deprecated parameter {old!r} ignored: {why}", f"{path}.{old}")
                params = {k: v for k, v in params.items() if k != old}
                continue
            self.warn(f"parameter {old!r} is deprecated; use {new!r}", f"{path}.{old}")
            params = {(new if k == old else k): v for k, v in params.items()}
        return params

    def transform(self, params: dict[str, Any], fn: Any, path: str) -> dict[str, Any]:
        if fn is None:
            return params
        try:
            new, warnings = fn(params)
        except ConfigError as exc:
            self.error(exc.message, f"{path}.{exc.path}" if exc.path else path)
            return params
        except (TypeError, ValueError) as exc:
            self.error(str(exc), path)
            return params
        for w in warnings:
            self.warn(w, path)
        out: dict[str, Any] = new
        return out

    def bind_default_producer(self, plugins: dict[str, PluginConfig]) -> None:
        """Bind prefix match-info consumers that name no producer, when several producers make
        the choice ambiguous, to ``approx-prefix-cache-producer`` (added when missing), as
        upstream binds them to its auto-created default producer."""

        def is_producer(p: PluginConfig) -> bool:
            return callable(getattr(p.spec.factory, "match_info", None))

        def consumes(p: PluginConfig) -> bool:
            return "scorer" in p.kinds and hasattr(p.params, PRODUCER_PARAM)

        unbound = [
            p
            for p in plugins.values()
            if consumes(p) and not is_producer(p) and not getattr(p.params, PRODUCER_PARAM)
        ]
        if not unbound:
            return
        sources = {
            (getattr(p.params, PRODUCER_PARAM, None) if consumes(p) else None) or p.name
            for p in plugins.values()
            if is_producer(p)
        }
        if len(sources) <= 1:
            return
        name = DEFAULT_PRODUCER
        if name not in plugins and self.inject(plugins, name, "pre-request") is None:
            return
        for p in unbound:
            p.params = p.params.model_copy(update={PRODUCER_PARAM: name})
            self.warn(
                f"{p.name!r} names no prefixMatchInfoProducerName and several prefix producers "
                f"are configured ({', '.join(sorted(sources))}): it reads {name!r}, upstream's "
                "default producer" + (" (added)" if plugins[name].injected else ""),
                p.path,
            )

    # -- ignored upstream sections -------------------------------------------------------------

    def ignored_sections(
        self, data: Mapping[str, Any], plugins: Mapping[str, PluginConfig]
    ) -> dict[str, Any]:
        ignored: dict[str, Any] = {}
        for key in _IGNORED_SECTIONS:
            if key not in data:
                continue
            value = data[key]
            refs: list[tuple[str, str | None, str]] = []  # (name, role, YAML path)
            if key == "featureGates":
                if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
                    self.error("expected a list of strings ('name', 'name=true|false')", key)
                    continue
                for i, gate in enumerate(value):
                    if not _FEATURE_GATE.match(gate):
                        self.error(f"invalid feature gate {gate!r}", f"{key}[{i}]")
                    elif gate.split("=", 1)[0] not in KNOWN_FEATURE_GATES:
                        self.error(
                            f"unknown feature gate {gate.split('=', 1)[0]!r} (known: "
                            f"{', '.join(sorted(KNOWN_FEATURE_GATES))})",
                            f"{key}[{i}]",
                        )
            else:
                parsed = self.section_shape(key, value)
                if parsed is None:
                    continue
                refs = _section_refs(key, parsed)
            for ref, role, where in refs:
                self.check_ref(ref, role, where, plugins)
            ignored[key] = value
            if key not in _FLOW_SECTIONS:
                self.warn(f"section {key!r} is accepted for compatibility and ignored here", key)
        return ignored

    def section_shape(self, key: str, value: Any) -> BaseModel | None:
        """The section validated against its upstream shape (None after an error)."""
        model: type[BaseModel]
        if key == "saturationDetector":
            is_ref = isinstance(value, Mapping) and "pluginRef" in value
            model = _SaturationRef if is_ref else _LegacySaturation
        else:
            shapes: dict[str, type[BaseModel]] = {
                "dataLayer": _DataLayer,
                "requestHandler": _RequestHandler,
                "parser": _Parser,
                "flowControl": _FlowControl,
            }
            model = shapes[key]
        if value is not None and not isinstance(value, Mapping):
            self.error(f"expected a mapping, got {type(value).__name__}", key)
            return None
        try:
            return model.model_validate(value if value is not None else {})
        except ValidationError as exc:
            for err in validation_errors(exc, model, key):
                self.error(err.message, err.path)
            return None

    def check_ref(
        self, ref: str, role: str | None, where: str, plugins: Mapping[str, PluginConfig]
    ) -> None:
        """`ref` names a plugin that plays `role` (an accepted no-op type passes: it warns)."""
        target = plugins.get(ref)
        if target is None:
            if ref not in self.failed:
                self.error(f"pluginRef {ref!r} names no plugin in plugins[]", where)
            return
        if role is not None and target.kinds and role not in target.kinds:
            roles = ", ".join(sorted(target.kinds))
            self.error(
                f"{ref!r} (type {target.type}) is no {role} (it is: {roles})",
                where,
            )

    def check_param_refs(self, plugins: Mapping[str, PluginConfig]) -> None:
        """Parameters that name other plugins (`PluginSpec.refs`) name one of the right role."""
        for p in list(plugins.values()):
            if not p.spec.refs:
                continue
            dumped = p.parameters()
            for dotted, role in p.spec.refs.items():
                value: Any = dumped
                for part in dotted.split("."):
                    value = value.get(part) if isinstance(value, Mapping) else None
                if isinstance(value, str) and value:
                    self.check_ref(value, role, f"{p.path}.parameters.{dotted}", plugins)

    def check_producer_loops(self, plugins: Mapping[str, PluginConfig]) -> None:
        """``prefixMatchInfoProducerName`` references must not form a loop."""
        reported: set[str] = set()
        for start in plugins:
            chain = [start]
            name = start
            while True:
                nxt = getattr(plugins[name].params, PRODUCER_PARAM, None)
                if not nxt or nxt == name or nxt not in plugins:
                    break
                if nxt in chain:
                    loop = chain[chain.index(nxt) :]
                    if not reported & set(loop):
                        reported.update(loop)
                        self.error(
                            "prefixMatchInfoProducerName references form a loop: "
                            + " -> ".join([*loop, nxt]),
                            f"{plugins[nxt].path}.parameters.prefixMatchInfoProducerName",
                        )
                    break
                chain.append(nxt)
                name = nxt

    # -- schedulingProfiles[] -------------------------------------------------------------------

    def profiles(self, raw: Any, plugins: dict[str, PluginConfig]) -> dict[str, ProfileConfig]:
        out: dict[str, ProfileConfig] = {}
        if raw is None:
            prof = ProfileConfig(DEFAULT_PROFILE, path="(default)")
            pickers: list[str] = []
            for p in plugins.values():
                if "filter" in p.kinds:
                    prof.filters.append(p.name)
                if "scorer" in p.kinds:
                    prof.scorers.append(ScorerRef(p.name, DEFAULT_WEIGHT))
                if "picker" in p.kinds:
                    pickers.append(p.name)
            if len(pickers) > 1:
                self.error(
                    f"several pickers ({', '.join(pickers)}) and no schedulingProfiles: "
                    "a profile has one picker",
                    "plugins",
                )
            elif pickers:
                prof.picker = pickers[0]
            out[DEFAULT_PROFILE] = prof
            return out
        if not isinstance(raw, list) or not raw:
            self.error("expected a non-empty list of {name, plugins}", "schedulingProfiles")
            return out
        for j, entry in enumerate(raw):
            path = f"schedulingProfiles[{j}]"
            parsed = self.profile(entry, path, plugins)
            if parsed is None:
                continue
            if parsed.name in out:
                self.error(
                    f"duplicate profile name {parsed.name!r} (first at {out[parsed.name].path})",
                    f"{path}.name",
                )
                continue
            out[parsed.name] = parsed
        return out

    def profile(
        self, entry: Any, path: str, plugins: dict[str, PluginConfig]
    ) -> ProfileConfig | None:
        if not isinstance(entry, Mapping):
            self.error("expected a mapping {name, plugins}", path)
            return None
        for k in entry:
            if k not in ("name", "plugins"):
                self.error(unknown_key(k, ("name", "plugins")), f"{path}.{k}")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            self.error("missing or not a string", f"{path}.name")
            return None
        refs = entry.get("plugins")
        if not isinstance(refs, list):
            self.error("expected a list of {pluginRef, weight?}", f"{path}.plugins")
            return None
        prof = ProfileConfig(name, path=path)
        seen: set[str] = set()
        for k, ref in enumerate(refs):
            rpath = f"{path}.plugins[{k}]"
            if not isinstance(ref, Mapping):
                self.error("expected a mapping {pluginRef, weight?}", rpath)
                continue
            for key in ref:
                if key not in ("pluginRef", "weight"):
                    self.error(unknown_key(key, ("pluginRef", "weight")), f"{rpath}.{key}")
            pname = ref.get("pluginRef")
            if not isinstance(pname, str) or not pname:
                self.error("missing or not a string", f"{rpath}.pluginRef")
                continue
            plugin = plugins.get(pname)
            if plugin is None and pname in self.failed:
                continue  # its own error was reported already
            if plugin is None:
                self.error(
                    f"pluginRef {pname!r} names no plugin in plugins[]", f"{rpath}.pluginRef"
                )
                continue
            if pname in seen:
                self.error(f"plugin {pname!r} listed twice in this profile", f"{rpath}.pluginRef")
                continue
            seen.add(pname)
            slots = [s for s in _PROFILE_SLOTS if s in plugin.kinds]
            if not slots and "profile-handler" in plugin.kinds:
                self.error(
                    f"plugin {pname!r} (type {plugin.type}) is a profile handler, not a filter, "
                    "scorer or picker",
                    f"{rpath}.pluginRef",
                )
                continue
            if not slots:
                # NOTE: upstream profiles may list plugins that are no filter, scorer or picker
                # here (e.g. IS's tokenizer, given a weight in its examples); skipping them
                # keeps such files loading.
                self.warn(
                    f"plugin {pname!r} (type {plugin.type}) is not a filter, scorer or picker; "
                    "ignored in this profile",
                    f"{rpath}.pluginRef",
                )
                continue
            weight = DEFAULT_WEIGHT
            if "weight" in ref:
                w = ref["weight"]
                if (
                    isinstance(w, bool)
                    or not isinstance(w, int | float)
                    or not math.isfinite(w)
                    or w < 0
                ):
                    self.error(f"weight must be a finite number >= 0, got {w!r}", f"{rpath}.weight")
                    continue
                weight = float(w)
                if "scorer" not in slots:
                    self.warn(f"weight ignored: {pname!r} is not a scorer", f"{rpath}.weight")
            if "filter" in slots:
                prof.filters.append(pname)
            if "scorer" in slots:
                prof.scorers.append(ScorerRef(pname, weight))
            if "picker" in slots:
                if prof.picker:
                    self.error(
                        f"a profile has one picker; already have {prof.picker!r}",
                        f"{rpath}.pluginRef",
                    )
                    continue
                prof.picker = pname
        return prof

    # -- defaults: handler and pickers ----------------------------------------------------------

    def inject(self, plugins: dict[str, PluginConfig], type_name: str, kind: str) -> str | None:
        existing = plugins.get(type_name)
        if existing is not None:
            if kind in existing.kinds:
                return existing.name
            self.error(
                f"cannot add the default {type_name!r}: the name is taken by a {existing.type!r}",
                existing.path,
            )
            return None
        try:
            spec, _ = self.registry.resolve(type_name)
        except ConfigError as exc:
            self.error(f"cannot add the default {type_name!r}: {exc.message}", None)
            return None
        plugins[type_name] = PluginConfig(
            type_name,
            spec.type,
            type_name,
            spec.params.model_validate({}),
            spec,
            "(injected)",
            True,
        )
        return type_name

    def profile_handler(
        self, plugins: dict[str, PluginConfig], profiles: dict[str, ProfileConfig]
    ) -> str:
        handlers = [p for p in plugins.values() if "profile-handler" in p.kinds]
        if len(handlers) > 1:
            names = ", ".join(h.name for h in handlers)
            self.error(f"multiple profile handlers found ({names}); only one is allowed", "plugins")
            return handlers[0].name
        if handlers:
            name = handlers[0].name
        elif len(profiles) > 1:
            # NOTE: a handler whose own entry failed is not reported missing as well.
            if not self.failed:
                self.error(
                    "no profile handler configured; several profiles need one "
                    "(e.g. a custom handler)",
                    "plugins",
                )
            return ""
        else:
            name = self.inject(plugins, DEFAULT_HANDLER, "profile-handler") or ""
        if name and plugins[name].type == DEFAULT_HANDLER and len(profiles) > 1:
            self.error(
                f"{DEFAULT_HANDLER} supports exactly one profile, got {len(profiles)}",
                "schedulingProfiles",
            )
        return name

    def inject_pickers(
        self, plugins: dict[str, PluginConfig], profiles: dict[str, ProfileConfig]
    ) -> None:
        for prof in profiles.values():
            if prof.picker:
                continue
            pickers = [p.name for p in plugins.values() if "picker" in p.kinds]
            if len(pickers) > 1:
                self.error(
                    f"profile {prof.name!r} has no picker and several are configured "
                    f"({', '.join(pickers)}); reference one",
                    prof.path,
                )
                continue
            prof.picker = (
                pickers[0] if pickers else (self.inject(plugins, DEFAULT_PICKER, "picker") or "")
            )

    def warn_unused(
        self, plugins: dict[str, PluginConfig], profiles: dict[str, ProfileConfig], handler: str
    ) -> None:
        used = {handler}
        for prof in profiles.values():
            used.update(prof.filters)
            used.update(s.name for s in prof.scorers)
            used.add(prof.picker)
        for p in plugins.values():
            if p.name in used or not p.kinds:
                continue
            if p.kinds & {"pre-request", "post-response"}:
                if p.kinds & set(_PROFILE_SLOTS):
                    self.warn(
                        f"plugin {p.name!r} is in no profile; only its request hooks run", p.path
                    )
                continue
            if not p.kinds & set(_PROFILE_SLOTS):
                continue  # a decider, parser, policy...: referenced elsewhere, not by profiles
            self.warn(f"plugin {p.name!r} is defined but used by no profile", p.path)


def load_config(data: Mapping[str, Any] | str | Path, registry: PluginRegistry) -> SchedulerConfig:
    """Validate an EndpointPickerConfig and apply the defaults.

    Args:
        data: The parsed YAML mapping, YAML text, or a `Path` to a YAML file.
        registry: Plugin types to resolve against.

    Raises:
        ConfigError: The problem (a `ConfigErrorGroup` listing all of them when there are
            several); each names its YAML path, and the file and line when read from YAML.
    """
    if not isinstance(data, str | Path):
        return _Loader(registry).load(data)
    doc = load_yaml(data)
    try:
        return _Loader(registry).load(doc.data)
    except ConfigError as exc:
        raise doc.locate(exc) from None
