"""Upstream compatibility rules of the EndpointPickerConfig: what llm-d / GIE accept, and how.

Loading (`kvaware_scorer.scheduler.loader`) is strict and generic; every rule that exists only
because upstream behaves that way lives here:

* the header: the deprecated ``apiVersion`` is accepted with a warning;
* upstream's default configuration when no plugin is given (`default_plugins`);
* deprecated parameter names, where a Go zero value means "not given" (`rename_params`);
* the top-level sections this host does not implement (``featureGates``, ``dataLayer``,
  ``flowControl``, ``requestHandler``, ``saturationDetector``, ``parser``): their shapes, the
  known feature gates, the plugins they reference and the roles those must play
  (`ignored_sections`);
* binding prefix match-info consumers that name no producer to upstream's default producer
  when several producers are configured (`bind_default_producer`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from kvaware_scorer.configio import validation_errors
from kvaware_scorer.scheduler.matchinfo import PRODUCER_PARAM
from kvaware_scorer.scheduler.registry import MATCH_INFO_CONSUMER, MATCH_INFO_PRODUCER
from kvaware_scorer.scheduler.resolved import (
    API_VERSION,
    DEPRECATED_API_VERSION,
    KIND,
    Diagnostics,
    PluginConfig,
)

__all__ = [
    "DEFAULT_HANDLER",
    "DEFAULT_PICKER",
    "DEFAULT_PROFILE",
    "FLOW_SECTIONS",
    "IGNORED_SECTIONS",
    "KNOWN_FEATURE_GATES",
    "bind_default_producer",
    "check_feature_gates",
    "check_header",
    "default_plugins",
    "ignored_sections",
    "is_unset",
    "rename_params",
    "section_refs",
    "section_shape",
]

#: Upstream's defaults: the profile made when none is given, the handler added when none is
#: configured (one profile only) and the picker a profile without one gets.
DEFAULT_PROFILE = "default"
DEFAULT_HANDLER = "single-profile-handler"
DEFAULT_PICKER = "max-score-picker"

#: Upstream top-level sections accepted, shape-checked and kept in `SchedulerConfig.ignored`.
IGNORED_SECTIONS = (
    "featureGates",
    "dataLayer",
    "flowControl",
    "requestHandler",
    "saturationDetector",
    "parser",
)
#: Sections that configure flow control (`kvaware_scorer.scheduler.flowcontrol`): used, kept
#: in `SchedulerConfig.ignored` for its builder (no "ignored" warning).
FLOW_SECTIONS = ("flowControl", "saturationDetector")

#: A plugin-injecting callback of the loader: (plugins, type, role) -> the name, or None.
Inject = Callable[[dict[str, PluginConfig], str, str], str | None]


# -- header ------------------------------------------------------------------------------------------


def check_header(diag: Diagnostics, data: Mapping[str, Any]) -> str:
    """Check ``apiVersion`` (the deprecated GIE one warns) and ``kind``; the version to keep."""
    api = data.get("apiVersion")
    if api is None:
        diag.error(f"missing (use {API_VERSION!r})", "apiVersion")
        api = API_VERSION
    elif api == DEPRECATED_API_VERSION:
        diag.warn(
            f"DEPRECATION: apiVersion {DEPRECATED_API_VERSION}/{KIND} is deprecated; "
            f"use {API_VERSION}",
            "apiVersion",
        )
    elif api != API_VERSION:
        diag.error(
            f"unsupported apiVersion {api!r} (use {API_VERSION!r} or {DEPRECATED_API_VERSION!r})",
            "apiVersion",
        )
    kind = data.get("kind")
    if kind != KIND:
        diag.error(f"must be {KIND!r}, got {kind!r}", "kind")
    return str(api)


# -- shapes of the upstream top-level sections -----------------------------------------------------


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
    # NOTE: optional upstream (``omitempty``): without it, the default utilization-detector.
    pluginRef: str | None = None


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
    "usageLimitPolicyPluginRef": "usage-limit-policy",
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


def section_refs(key: str, parsed: BaseModel) -> list[tuple[str, str | None, str]]:
    """(plugin name, required role or None, YAML path) of every reference in a section."""
    if isinstance(parsed, _FlowControl):
        out: list[tuple[str, str | None, str]] = []
        if parsed.saturationDetector is not None and parsed.saturationDetector.pluginRef:
            out.append(
                (
                    parsed.saturationDetector.pluginRef,
                    _REF_ROLES["saturationDetector"],
                    f"{key}.saturationDetector.pluginRef",
                )
            )
        if parsed.usageLimitPolicyPluginRef:
            out.append(
                (
                    parsed.usageLimitPolicyPluginRef,
                    _REF_ROLES["usageLimitPolicyPluginRef"],
                    f"{key}.usageLimitPolicyPluginRef",
                )
            )
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
        if not parsed.pluginRef:
            return []
        return [(parsed.pluginRef, _REF_ROLES["saturationDetector"], f"{key}.pluginRef")]
    if isinstance(parsed, _RequestHandler):
        return [
            (p.pluginRef, _REF_ROLES["parser"], f"{key}.parsers[{i}].pluginRef")
            for i, p in enumerate(parsed.parsers)
        ]
    if isinstance(parsed, _Parser):
        return [(parsed.pluginRef, _REF_ROLES["parser"], f"{key}.pluginRef")]
    return [(ref, None, key) for ref in _refs(parsed)]


def is_unset(value: Any) -> bool:
    """Whether `value` is a Go zero value (upstream reads it as not given)."""
    return value is None or (not isinstance(value, bool) and value in (0, ""))


def default_plugins() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Upstream's default configuration (``loadDefaultConfig``): plugins and profiles."""
    weights = {"queue-scorer": 2, "kv-cache-utilization-scorer": 2, "prefix-cache-scorer": 3}
    plugins = [{"type": t} for t in weights]
    refs = [{"pluginRef": t, "weight": w} for t, w in weights.items()]
    return plugins, [{"name": DEFAULT_PROFILE, "plugins": refs}]


# -- deprecated parameter names ------------------------------------------------------------------


def rename_params(
    diag: Diagnostics, params: dict[str, Any], aliases: Mapping[str, str], path: str
) -> dict[str, Any]:
    """`params` with deprecated names replaced by current ones (each with a warning)."""
    for old, new in aliases.items():
        if old not in params:
            continue
        if new in params or is_unset(params[old]):
            # NOTE: as upstream: the current name wins, and a Go zero value means unset.
            why = f"{new!r} is given" if new in params else "its value means unset"
            diag.warn(f"deprecated parameter {old!r} ignored: {why}", f"{path}.{old}")
            params = {k: v for k, v in params.items() if k != old}
            continue
        diag.warn(f"parameter {old!r} is deprecated; use {new!r}", f"{path}.{old}")
        params = {(new if k == old else k): v for k, v in params.items()}
    return params


# -- the top-level sections this host does not implement -----------------------------------------

#: Checks that a plugin reference names a configured plugin of a role: (name, role, YAML path).
CheckRef = Callable[[str, str | None, str], None]


def ignored_sections(
    diag: Diagnostics, data: Mapping[str, Any], check_ref: CheckRef
) -> dict[str, Any]:
    """The upstream sections present in `data`, shape-checked, each plugin reference they make
    checked with `check_ref`; a section that is not flow control warns that it is ignored."""
    ignored: dict[str, Any] = {}
    for key in IGNORED_SECTIONS:
        if key not in data:
            continue
        value = data[key]
        refs: list[tuple[str, str | None, str]] = []  # (name, role, YAML path)
        if key == "featureGates":
            if not check_feature_gates(diag, value, key):
                continue
        else:
            parsed = section_shape(diag, key, value)
            if parsed is None:
                continue
            refs = section_refs(key, parsed)
        for ref, role, where in refs:
            check_ref(ref, role, where)
        ignored[key] = value
        if key == "featureGates":
            # NOTE: the flowControl gate is honoured (it turns flow control on); name only the
            # gates that change nothing here.
            inert = [g for g in value if g.split("=", 1)[0] != "flowControl"]
            if inert:
                diag.warn(
                    f"feature gates {', '.join(inert)} are accepted for compatibility and "
                    "ignored here",
                    key,
                )
        elif key not in FLOW_SECTIONS:
            diag.warn(f"section {key!r} is accepted for compatibility and ignored here", key)
    return ignored


def check_feature_gates(diag: Diagnostics, value: Any, key: str) -> bool:
    """Check ``featureGates`` entries against upstream's gates; False when not a string list."""
    if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
        diag.error("expected a list of strings ('name', 'name=true|false')", key)
        return False
    for i, gate in enumerate(value):
        if not _FEATURE_GATE.match(gate):
            diag.error(f"invalid feature gate {gate!r}", f"{key}[{i}]")
        elif gate.split("=", 1)[0] not in KNOWN_FEATURE_GATES:
            diag.error(
                f"unknown feature gate {gate.split('=', 1)[0]!r} (known: "
                f"{', '.join(sorted(KNOWN_FEATURE_GATES))})",
                f"{key}[{i}]",
            )
    return True


def section_shape(diag: Diagnostics, key: str, value: Any) -> BaseModel | None:
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
        diag.error(f"expected a mapping, got {type(value).__name__}", key)
        return None
    try:
        return model.model_validate(value if value is not None else {})
    except ValidationError as exc:
        for err in validation_errors(exc, model, key):
            diag.error(err.message, err.path)
        return None


# -- the default match-info producer ---------------------------------------------------------------


def _consumes(p: PluginConfig) -> bool:
    return "scorer" in p.kinds and hasattr(p.params, PRODUCER_PARAM)


def _produces(p: PluginConfig) -> bool:
    return MATCH_INFO_PRODUCER in p.capabilities


def _add_missing_producer(
    diag: Diagnostics, plugins: dict[str, PluginConfig], default: str | None, inject: Inject
) -> None:
    if default is None or any(_produces(p) for p in plugins.values()):
        return
    needy = [
        p
        for p in plugins.values()
        if MATCH_INFO_CONSUMER in p.capabilities and not getattr(p.params, PRODUCER_PARAM, None)
    ]
    if not needy or inject(plugins, default, "pre-request") is None:
        return
    names = ", ".join(repr(p.name) for p in needy)
    diag.warn(
        f"{names} {'needs' if len(needy) == 1 else 'need'} prefix match info and no prefix "
        f"producer is configured: added {default!r}, as upstream auto-creates its default "
        "producer",
        needy[0].path,
    )


def bind_default_producer(
    diag: Diagnostics, plugins: dict[str, PluginConfig], default: str | None, inject: Inject
) -> None:
    """Bind prefix match-info consumers that name no producer, when several producers make
    the choice ambiguous, to the `default` producer (added when missing), as upstream binds
    them to its auto-created default producer. With no producer at all, the `default` one is
    added when a plugin cannot work without match info (`MATCH_INFO_CONSUMER`), as upstream
    auto-creates the default producer of a Required data key."""
    _add_missing_producer(diag, plugins, default, inject)
    unbound = [
        p
        for p in plugins.values()
        if _consumes(p) and not _produces(p) and not getattr(p.params, PRODUCER_PARAM)
    ]
    if not unbound:
        return
    # NOTE: a producer that also reads match info and names none reads the default producer
    # when that is configured (`matchinfo.match_sources`): one source, not two.
    sources = {
        (getattr(p.params, PRODUCER_PARAM, None) if _consumes(p) else None)
        or (default if _consumes(p) and default in plugins and default != p.name else p.name)
        for p in plugins.values()
        if _produces(p)
    }
    if len(sources) <= 1 or default is None:
        return
    if default not in plugins and inject(plugins, default, "pre-request") is None:
        return
    for p in unbound:
        p.params = p.params.model_copy(update={PRODUCER_PARAM: default})
        diag.warn(
            f"{p.name!r} names no prefixMatchInfoProducerName and several prefix producers "
            f"are configured ({', '.join(sorted(sources))}): it reads {default!r}, upstream's "
            "default producer" + (" (added)" if plugins[default].injected else ""),
            p.path,
        )
