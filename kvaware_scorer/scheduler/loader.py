"""Loading an EndpointPickerConfig: strict validation of ``plugins[]`` and
``schedulingProfiles[]`` against the plugin registry, and the defaults that complete it.

`Loader.load` turns a parsed YAML mapping into a `SchedulerConfig`: each plugin's ``type`` is
resolved in the registry and its ``parameters`` validated by the type's model, profiles are
slotted (filters, weighted scorers, one picker), references are checked, and the missing
profile handler and pickers are added. Every error is collected, with its YAML path, before one
`ConfigErrorGroup` is raised. The rules that exist for upstream compatibility (header, default
configuration, deprecated parameters, ignored sections, the default producer) are applied from
`kvaware_scorer.scheduler.upstream`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

import kvaware_scorer.scheduler.upstream as upstream
from kvaware_scorer.configio import errors_of, join_path, unknown_key, validation_errors
from kvaware_scorer.errors import ConfigError, ConfigErrorGroup
from kvaware_scorer.scheduler.matchinfo import PRODUCER_PARAM
from kvaware_scorer.scheduler.registry import NoParameters, PluginRegistry
from kvaware_scorer.scheduler.resolved import (
    DEFAULT_WEIGHT,
    Diagnostics,
    PluginConfig,
    ProfileConfig,
    SchedulerConfig,
    ScorerRef,
)
from kvaware_scorer.scheduler.upstream import (
    DEFAULT_HANDLER,
    DEFAULT_PICKER,
    DEFAULT_PROFILE,
)

__all__ = ["Loader"]

_PROFILE_SLOTS = ("filter", "scorer", "picker")
_TOP_KEYS = ("apiVersion", "kind", "plugins", "schedulingProfiles", *upstream.IGNORED_SECTIONS)


class Loader:
    """One resolution pass over an EndpointPickerConfig; collects every error before raising.

    Args:
        registry: The plugin types to resolve ``type``s against.
    """

    def __init__(self, registry: PluginRegistry) -> None:
        self.registry = registry
        self.diag = Diagnostics()
        self.failed: set[str] = set()  # names of plugin entries that failed validation

    # -- top level --------------------------------------------------------------------------

    def load(self, data: Any) -> SchedulerConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping at the top level, got {type(data).__name__}")
        for key in data:
            if key not in _TOP_KEYS:
                self.diag.error(unknown_key(key, _TOP_KEYS), str(key))
        api = upstream.check_header(self.diag, data)
        raw_plugins, raw_profiles = data.get("plugins"), data.get("schedulingProfiles")
        if not raw_plugins and raw_profiles is None:
            # NOTE: upstream runs its default configuration when none is given; so does an
            # EndpointPickerConfig that lists no plugins here.
            self.diag.warn(
                "no plugins: using upstream's default profile (queue-scorer 2, "
                "kv-cache-utilization-scorer 2, prefix-cache-scorer 3)",
                "plugins",
            )
            raw_plugins, raw_profiles = upstream.default_plugins()
        plugins = self.plugins(raw_plugins)
        default_producer = self.registry.default_producer
        upstream.bind_default_producer(self.diag, plugins, default_producer, self.inject)
        self.check_producer_loops(plugins)
        self.check_param_refs(plugins)
        referenced: set[str] = set()  # plugins the upstream sections use (a detector, ...)

        def check_section_ref(ref: str, role: str | None, where: str) -> None:
            referenced.add(ref)
            self.check_ref(ref, role, where, plugins)

        ignored = upstream.ignored_sections(self.diag, data, check_section_ref)
        profiles = self.profiles(raw_profiles, plugins)
        handler = self.profile_handler(plugins, profiles)
        if not self.diag.errors:
            self.inject_pickers(plugins, profiles)
            self.warn_unused(plugins, profiles, {handler, *referenced})
        if self.diag.errors:
            raise ConfigErrorGroup(self.diag.errors)
        return SchedulerConfig(
            api_version=api,
            plugins=plugins,
            profiles=profiles,
            profile_handler=handler,
            ignored=ignored,
            warnings=self.diag.warnings,
            default_producer=default_producer,
        )

    # -- plugins[] --------------------------------------------------------------------------

    def plugins(self, raw: Any) -> dict[str, PluginConfig]:
        out: dict[str, PluginConfig] = {}
        if raw is None:
            self.diag.error("missing (a list of {type, name?, parameters?})", "plugins")
            return out
        if not isinstance(raw, list):
            self.diag.error(f"expected a list, got {type(raw).__name__}", "plugins")
            return out
        for i, entry in enumerate(raw):
            path = f"plugins[{i}]"
            plugin = self.plugin(entry, path)
            if plugin is None:
                continue
            if plugin.name in out:
                first = out[plugin.name].path
                self.diag.error(f"duplicate plugin name {plugin.name!r} (first at {first})", path)
                continue
            out[plugin.name] = plugin
        return out

    def plugin(self, entry: Any, path: str) -> PluginConfig | None:
        if not isinstance(entry, Mapping):
            self.diag.error(f"expected a mapping {{type, name?, parameters?}}, got {entry!r}", path)
            return None
        bad = [k for k in entry if k not in ("type", "name", "parameters")]
        for k in bad:
            self.diag.error(unknown_key(k, ("type", "name", "parameters")), f"{path}.{k}")
        written = entry.get("type")
        if not isinstance(written, str) or not written:
            self.diag.error("missing or not a string", f"{path}.type")
            return None
        name = entry.get("name", written)
        if not isinstance(name, str) or not name:
            self.diag.error("must be a non-empty string", f"{path}.name")
            return None
        n_errors = len(self.diag.errors)
        plugin = self._plugin(entry, path, written, name)
        if plugin is None or len(self.diag.errors) > n_errors:
            self.failed.add(name)
            return None
        return plugin

    def _plugin(
        self, entry: Mapping[str, Any], path: str, written: str, name: str
    ) -> PluginConfig | None:
        try:
            spec, alias = self.registry.resolve(written)
        except ConfigError as exc:
            self.diag.error(exc.message, f"{path}.type")
            return None
        raw_params = entry.get("parameters")
        if raw_params is None:
            raw_params = {}
        if not isinstance(raw_params, Mapping):
            self.diag.error(
                f"expected a mapping, got {type(raw_params).__name__}", f"{path}.parameters"
            )
            return None
        params_path = f"{path}.parameters"
        params = dict(raw_params)
        if alias is not None:
            self.diag.warn(
                f"plugin type {alias.old!r} is deprecated; use {alias.new!r}", f"{path}.type"
            )
            params = upstream.rename_params(self.diag, params, alias.param_aliases, params_path)
            params = self.transform(params, alias.transform, params_path)
        if spec.params is NoParameters and params:
            # NOTE: upstream's factories of parameterless types never decode `parameters`.
            self.diag.warn(
                f"plugin type {spec.type!r} takes no parameters; "
                f"{', '.join(map(str, params))} ignored (as upstream)",
                params_path,
            )
            params = {}
        n_errors = len(self.diag.errors)
        params = upstream.rename_params(self.diag, params, spec.param_aliases, params_path)
        params = self.transform(params, spec.transform, params_path)
        if len(self.diag.errors) > n_errors:
            return None
        try:
            model = spec.params.model_validate(params)
        except ValidationError as exc:
            for err in validation_errors(exc, spec.params, params_path):
                self.diag.error(err.message, err.path)
            return None
        except ConfigError as exc:
            for err in errors_of(exc):
                self.diag.error(
                    err.message, join_path(params_path, err.path) if err.path else params_path
                )
            return None
        if spec.inert:
            self.diag.warn(
                f"plugin type {spec.type!r} is accepted for compatibility with upstream "
                "configs and does nothing here",
                path,
            )
        return PluginConfig(name, spec.type, written, model, spec, path)

    def transform(self, params: dict[str, Any], fn: Any, path: str) -> dict[str, Any]:
        if fn is None:
            return params
        try:
            new, warnings = fn(params)
        except ConfigError as exc:
            self.diag.error(exc.message, f"{path}.{exc.path}" if exc.path else path)
            return params
        except (TypeError, ValueError) as exc:
            self.diag.error(str(exc), path)
            return params
        for w in warnings:
            self.diag.warn(w, path)
        out: dict[str, Any] = new
        return out

    # -- references ---------------------------------------------------------------------------

    def check_ref(
        self, ref: str, role: str | None, where: str, plugins: Mapping[str, PluginConfig]
    ) -> None:
        """`ref` names a plugin that plays `role` (an accepted no-op type passes: it warns)."""
        target = plugins.get(ref)
        if target is None:
            if ref not in self.failed:
                self.diag.error(f"pluginRef {ref!r} names no plugin in plugins[]", where)
            return
        if role is not None and target.kinds and role not in target.kinds:
            roles = ", ".join(sorted(target.kinds))
            self.diag.error(
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
                        self.diag.error(
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
                self.diag.error(
                    f"several pickers ({', '.join(pickers)}) and no schedulingProfiles: "
                    "a profile has one picker",
                    "plugins",
                )
            elif pickers:
                prof.picker = pickers[0]
            out[DEFAULT_PROFILE] = prof
            return out
        if not isinstance(raw, list) or not raw:
            self.diag.error("expected a non-empty list of {name, plugins}", "schedulingProfiles")
            return out
        for j, entry in enumerate(raw):
            path = f"schedulingProfiles[{j}]"
            parsed = self.profile(entry, path, plugins)
            if parsed is None:
                continue
            if parsed.name in out:
                self.diag.error(
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
            self.diag.error("expected a mapping {name, plugins}", path)
            return None
        for k in entry:
            if k not in ("name", "plugins"):
                self.diag.error(unknown_key(k, ("name", "plugins")), f"{path}.{k}")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            self.diag.error("missing or not a string", f"{path}.name")
            return None
        refs = entry.get("plugins")
        if not isinstance(refs, list):
            self.diag.error("expected a list of {pluginRef, weight?}", f"{path}.plugins")
            return None
        prof = ProfileConfig(name, path=path)
        seen: set[str] = set()
        for k, ref in enumerate(refs):
            self.profile_ref(prof, ref, f"{path}.plugins[{k}]", plugins, seen)
        return prof

    def profile_ref(
        self,
        prof: ProfileConfig,
        ref: Any,
        rpath: str,
        plugins: dict[str, PluginConfig],
        seen: set[str],
    ) -> None:
        """Slot one ``{pluginRef, weight?}`` of a profile into its filters, scorers or picker."""
        plugin = self.referenced(ref, rpath, plugins, seen)
        if plugin is None:
            return
        pname = plugin.name
        slots = self.slots(plugin, rpath)
        if not slots:
            return
        weight = DEFAULT_WEIGHT
        if "weight" in ref:
            w = ref["weight"]
            if (
                isinstance(w, bool)
                or not isinstance(w, int | float)
                or not math.isfinite(w)
                or w < 0
            ):
                self.diag.error(
                    f"weight must be a finite number >= 0, got {w!r}", f"{rpath}.weight"
                )
                return
            weight = float(w)
            if "scorer" not in slots:
                self.diag.warn(f"weight ignored: {pname!r} is not a scorer", f"{rpath}.weight")
        if "filter" in slots:
            prof.filters.append(pname)
        if "scorer" in slots:
            prof.scorers.append(ScorerRef(pname, weight))
        if "picker" in slots:
            if prof.picker:
                self.diag.error(
                    f"a profile has one picker; already have {prof.picker!r}",
                    f"{rpath}.pluginRef",
                )
                return
            prof.picker = pname

    def referenced(
        self, ref: Any, rpath: str, plugins: dict[str, PluginConfig], seen: set[str]
    ) -> PluginConfig | None:
        """The plugin a profile entry references, once per profile (None after an error)."""
        if not isinstance(ref, Mapping):
            self.diag.error("expected a mapping {pluginRef, weight?}", rpath)
            return None
        for key in ref:
            if key not in ("pluginRef", "weight"):
                self.diag.error(unknown_key(key, ("pluginRef", "weight")), f"{rpath}.{key}")
        pname = ref.get("pluginRef")
        if not isinstance(pname, str) or not pname:
            self.diag.error("missing or not a string", f"{rpath}.pluginRef")
            return None
        plugin = plugins.get(pname)
        if plugin is None and pname in self.failed:
            return None  # its own error was reported already
        if plugin is None:
            self.diag.error(
                f"pluginRef {pname!r} names no plugin in plugins[]", f"{rpath}.pluginRef"
            )
            return None
        if pname in seen:
            self.diag.error(f"plugin {pname!r} listed twice in this profile", f"{rpath}.pluginRef")
            return None
        seen.add(pname)
        return plugin

    def slots(self, plugin: PluginConfig, rpath: str) -> list[str]:
        """The profile slots `plugin` fills (empty, with an error or a warning, when none)."""
        slots = [s for s in _PROFILE_SLOTS if s in plugin.kinds]
        if not slots and "profile-handler" in plugin.kinds:
            self.diag.error(
                f"plugin {plugin.name!r} (type {plugin.type}) is a profile handler, not a "
                "filter, scorer or picker",
                f"{rpath}.pluginRef",
            )
        elif not slots:
            # NOTE: upstream profiles may list plugins that are no filter, scorer or picker
            # here (e.g. IS's tokenizer, given a weight in its examples); skipping them
            # keeps such files loading.
            hooks = plugin.kinds & {"pre-request", "post-response"}
            self.diag.warn(
                f"plugin {plugin.name!r} (type {plugin.type}) is not a filter, scorer or "
                "picker; ignored in this profile"
                + ("; its request hooks run for every request" if hooks else ""),
                f"{rpath}.pluginRef",
            )
        return slots

    # -- defaults: handler and pickers ----------------------------------------------------------

    def inject(self, plugins: dict[str, PluginConfig], type_name: str, kind: str) -> str | None:
        existing = plugins.get(type_name)
        if existing is not None:
            if kind in existing.kinds:
                return existing.name
            self.diag.error(
                f"cannot add the default {type_name!r}: the name is taken by a {existing.type!r}",
                existing.path,
            )
            return None
        try:
            spec, _ = self.registry.resolve(type_name)
        except ConfigError as exc:
            self.diag.error(f"cannot add the default {type_name!r}: {exc.message}", None)
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
            self.diag.error(
                f"multiple profile handlers found ({names}); only one is allowed", "plugins"
            )
            return handlers[0].name
        if handlers:
            name = handlers[0].name
        elif len(profiles) > 1:
            # NOTE: a handler whose own entry failed is not reported missing as well.
            if not self.failed:
                self.diag.error(
                    "no profile handler configured; several profiles need one "
                    "(e.g. a custom handler)",
                    "plugins",
                )
            return ""
        else:
            name = self.inject(plugins, DEFAULT_HANDLER, "profile-handler") or ""
        if name and plugins[name].type == DEFAULT_HANDLER and len(profiles) > 1:
            self.diag.error(
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
                self.diag.error(
                    f"profile {prof.name!r} has no picker and several are configured "
                    f"({', '.join(pickers)}); reference one",
                    prof.path,
                )
                continue
            prof.picker = (
                pickers[0] if pickers else (self.inject(plugins, DEFAULT_PICKER, "picker") or "")
            )

    def warn_unused(
        self,
        plugins: dict[str, PluginConfig],
        profiles: dict[str, ProfileConfig],
        referenced: set[str],
    ) -> None:
        """Warn about plugins no profile uses and nothing else references (`referenced`: the
        profile handler and the plugins the upstream sections name, such as the saturation
        detector of ``flowControl``)."""
        used = set(referenced)
        for prof in profiles.values():
            used.update(prof.filters)
            used.update(s.name for s in prof.scorers)
            used.add(prof.picker)
        for p in plugins.values():
            if p.name in used or not p.kinds:
                continue
            if p.kinds & {"pre-request", "post-response"}:
                if p.kinds & set(_PROFILE_SLOTS):
                    self.diag.warn(
                        f"plugin {p.name!r} is in no profile; only its request hooks run", p.path
                    )
                continue
            if not p.kinds & set(_PROFILE_SLOTS):
                continue  # a decider, parser, policy...: referenced elsewhere, not by profiles
            self.diag.warn(f"plugin {p.name!r} is defined but used by no profile", p.path)
