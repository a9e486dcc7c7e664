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

This module is the public face of configuration loading (`load_config`); the resolved model is
`kvaware_scorer.scheduler.resolved`, the strict loader `kvaware_scorer.scheduler.loader` and the
upstream-compatibility rules `kvaware_scorer.scheduler.upstream`, re-exported here where they
were public.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvaware_scorer.configio import load_yaml, parse_duration, read_yaml
from kvaware_scorer.errors import ConfigError, ConfigErrorGroup
from kvaware_scorer.scheduler.loader import Loader
from kvaware_scorer.scheduler.registry import PluginRegistry
from kvaware_scorer.scheduler.resolved import (
    API_VERSION,
    DEFAULT_WEIGHT,
    DEPRECATED_API_VERSION,
    KIND,
    PluginConfig,
    ProfileConfig,
    SchedulerConfig,
    ScorerRef,
)
from kvaware_scorer.scheduler.upstream import (
    DEFAULT_HANDLER,
    DEFAULT_PICKER,
    DEFAULT_PROFILE,
    KNOWN_FEATURE_GATES,
)

__all__ = [
    "API_VERSION",
    "DEFAULT_HANDLER",
    "DEFAULT_PICKER",
    "DEFAULT_PROFILE",
    "DEFAULT_WEIGHT",
    "DEPRECATED_API_VERSION",
    "KIND",
    "KNOWN_FEATURE_GATES",
    "ConfigErrorGroup",
    "PluginConfig",
    "ProfileConfig",
    "SchedulerConfig",
    "ScorerRef",
    "load_config",
    "parse_duration",
    "read_yaml",
]


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
        return Loader(registry).load(data)
    doc = load_yaml(data)
    try:
        return Loader(registry).load(doc.data)
    except ConfigError as exc:
        raise doc.locate(exc) from None
