"""The resolved EndpointPickerConfig model: what loading produces and the scheduler builds from.

`SchedulerConfig` holds plugins (`PluginConfig`: validated parameters and the registered spec)
and profiles (`ProfileConfig`: filters, weighted scorers, one picker) with every default
applied; `to_dict` writes it back in the upstream YAML form. `Diagnostics` collects the errors
and warnings of one loading pass. Loading itself is `kvaware_scorer.scheduler.loader`; the
upstream-compatibility rules it applies are `kvaware_scorer.scheduler.upstream`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import BaseModel

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler.registry import PluginSpec

__all__ = [
    "API_VERSION",
    "DEFAULT_WEIGHT",
    "DEPRECATED_API_VERSION",
    "KIND",
    "Diagnostics",
    "PluginConfig",
    "ProfileConfig",
    "SchedulerConfig",
    "ScorerRef",
]

logger = logging.getLogger("kvaware_scorer.scheduler.config")

API_VERSION = "llm-d.ai/v1alpha1"
DEPRECATED_API_VERSION = "inference.networking.x-k8s.io/v1alpha1"
KIND = "EndpointPickerConfig"
DEFAULT_WEIGHT = 1.0


class Diagnostics:
    """Errors and warnings of one loading pass (every error is collected before raising)."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []
        self.warnings: list[str] = []

    def error(self, message: str, path: str | None) -> None:
        """Record an error at YAML `path`."""
        self.errors.append(ConfigError(message, path))

    def warn(self, message: str, path: str | None = None) -> None:
        """Record (and log) a warning at YAML `path`."""
        text = f"{path}: {message}" if path else message
        self.warnings.append(text)
        logger.warning("%s", text)


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

    @property
    def capabilities(self) -> frozenset[str]:
        """What the plugin's objects provide to other plugins (`PluginSpec.capabilities`)."""
        return self.spec.capabilities

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
        default_producer: Name of the match-info producer a consumer naming none reads when
            it is configured (`PluginRegistry.default_producer`), or None.
    """

    api_version: str
    plugins: dict[str, PluginConfig]
    profiles: dict[str, ProfileConfig]
    profile_handler: str
    ignored: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    default_producer: str | None = None

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
            roles = ", ".join(sorted(p.kinds)) or ("inert" if p.spec.inert else "background")
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
