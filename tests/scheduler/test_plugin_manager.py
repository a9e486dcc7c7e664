"""Plugin manager: entry-point loading (built-ins and a real third-party distribution), blocking,
the typed hook facade and the registry's rules."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler import (
    BLOCK_ENV,
    Endpoint,
    Hooks,
    PluginContext,
    PluginRegistry,
    Scheduler,
    SchedulingRequest,
    hookimpl,
    make_plugin_manager,
)

from .conftest import config, endpoints

DIST = "kvaware-demo-plugin"
MODULE = "kvaware_demo_plugin"

PLUGIN_SOURCE = '''
"""A third-party kvaware plugin distribution (test fixture)."""

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.scheduler import hookimpl

EVENTS = []


class PreferLabelParams(ConfigModel):
    label: str
    value: str


class PreferLabelScorer:
    def __init__(self, params, ctx):
        self.label = params.label
        self.value = params.value

    def score(self, ctx, request, endpoints):
        return {e.id: 1.0 if e.labels.get(self.label) == self.value else 0.0 for e in endpoints}


@hookimpl
def kvaware_register_plugins(registry):
    registry.register("prefer-label-scorer", PreferLabelScorer, params=PreferLabelParams)


@hookimpl
def kvaware_scheduler_created(scheduler):
    EVENTS.append(("created", sorted(scheduler.plugins)))
'''

PYPROJECT = f"""
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{DIST}"
version = "0.0.1"

[project.entry-points."kvaware_scorer.plugins"]
demo = "{MODULE}"

[tool.setuptools]
packages = ["{MODULE}"]
"""


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The demo distribution built and pip-installed into a private target directory."""
    src = tmp_path_factory.mktemp("demo-src")
    (src / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (src / MODULE).mkdir()
    (src / MODULE / "__init__.py").write_text(PLUGIN_SOURCE)
    target = tmp_path_factory.mktemp("demo-site")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert list(target.glob("kvaware_demo_plugin-0.0.1.dist-info/entry_points.txt"))
    yield target
    sys.modules.pop(MODULE, None)


@pytest.fixture
def on_path(installed_plugin: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The demo distribution importable (and its entry points visible) for one test."""
    monkeypatch.syspath_prepend(str(installed_plugin))
    yield installed_plugin
    sys.modules.pop(MODULE, None)


def test_third_party_distribution_is_loaded_and_used_from_yaml(on_path: Path) -> None:
    """An installed distribution's entry point registers a type that YAML then uses."""
    pm = make_plugin_manager(use_env=False)
    assert {"builtins", "demo"} <= set(Hooks(pm).plugin_names())
    yaml_text = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: prefer-label-scorer
    parameters: {label: tier, value: gold}
  - type: queue-scorer
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: prefer-label-scorer
        weight: 5
      - pluginRef: queue-scorer
"""
    s = Scheduler.from_config(yaml_text, plugin_manager=pm, seed=0)
    eps = endpoints(3)
    eps[2].labels["tier"] = "gold"
    r = s.schedule(SchedulingRequest("r", "m", token_ids=[1]), eps)
    assert r.targets == [eps[2]]
    assert r.weights["prefer-label-scorer"] == 5.0
    demo = sys.modules[MODULE]
    assert demo.EVENTS[-1] == (
        "created",
        ["max-score-picker", "prefer-label-scorer", "queue-scorer", "single-profile-handler"],
    )


def test_third_party_parameters_are_strict(on_path: Path) -> None:
    """A third-party type's parameters are validated with YAML paths like the built-ins'."""
    data = config([{"type": "prefer-label-scorer", "parameters": {"label": "tier"}}])
    with pytest.raises(ConfigError) as info:
        Scheduler.from_config(data, plugin_manager=make_plugin_manager(use_env=False))
    assert info.value.path == "plugins[0].parameters.value"


def test_plugins_blocked_by_environment(on_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KVAWARE_BLOCK_PLUGINS keeps a named plugin from loading, so its types are unknown."""
    monkeypatch.setenv(BLOCK_ENV, "demo")
    pm = make_plugin_manager()
    assert "demo" not in Hooks(pm).plugin_names()
    with pytest.raises(ConfigError, match="unknown plugin type 'prefer-label-scorer'"):
        Scheduler.from_config(
            config([{"type": "prefer-label-scorer", "parameters": {"label": "a", "value": "b"}}]),
            plugin_manager=pm,
        )


def test_builtins_blocked_by_argument() -> None:
    """The factory's block argument removes the built-ins (they load through the same entry points)."""
    pm = make_plugin_manager(block=["builtins"], use_env=False)
    reg = PluginRegistry()
    Hooks(pm).register_plugins(reg)
    assert "queue-scorer" not in reg.types()
    with pytest.raises(
        ConfigError, match=r"plugins\[0\]\.type: unknown plugin type 'queue-scorer'"
    ):
        Scheduler.from_config(config([{"type": "queue-scorer"}]), plugin_manager=pm)


def test_builtins_come_from_the_entry_point() -> None:
    """Without entry points there are no built-in types: there is no second loading path."""
    reg = PluginRegistry()
    Hooks(make_plugin_manager(entry_points=False)).register_plugins(reg)
    assert reg.types() == []


def test_unknown_hook_is_rejected() -> None:
    """A plugin implementing a hook that does not exist fails check_pending with a ConfigError."""

    class Typo:
        @hookimpl
        def kvaware_register_plugin(self, registry: PluginRegistry) -> None:
            pass

    with pytest.raises(ConfigError, match="unknown hook"):
        make_plugin_manager(entry_points=False, plugins=[Typo()])


class _Scorer:
    def __init__(self, params: Any, ctx: PluginContext) -> None:
        pass

    def score(self, ctx: Any, request: Any, endpoints: Any) -> dict[str, float]:
        return {}


def test_duplicate_type_needs_override() -> None:
    """Registering a type twice is an error naming both sources unless override=True is given."""
    reg = PluginRegistry()
    reg.register("x", _Scorer)
    with pytest.raises(ConfigError, match="registered twice"):
        reg.register("x", _Scorer)
    reg.register("x", _Scorer, override=True, description="replaced")
    assert reg.resolve("x")[0].description == "replaced"


def test_installed_override_wins_over_builtin() -> None:
    """A plugin registering a built-in type with override=True replaces it (built-ins register last)."""

    class MyQueue(_Scorer):
        pass

    class Override:
        @hookimpl
        def kvaware_register_plugins(self, registry: PluginRegistry) -> None:
            registry.register("queue-scorer", MyQueue, override=True)

    pm = make_plugin_manager(use_env=False, plugins=[Override()])
    s = Scheduler.from_config(config([{"type": "queue-scorer"}]), plugin_manager=pm)
    assert isinstance(s.plugin("queue-scorer"), MyQueue)


def test_roles_inferred_from_class_methods() -> None:
    """A class factory's roles are inferred from its methods."""
    reg = PluginRegistry()
    reg.register("s", _Scorer)
    assert reg.resolve("s")[0].kinds == frozenset({"scorer"})


def test_lifecycle_hooks_fire() -> None:
    """scheduler_created/started/stopped and endpoints_changed reach installed plugins once each."""
    seen: list[Any] = []

    class Watch:
        @hookimpl
        def kvaware_config_resolved(self, config: Any) -> None:
            seen.append(("resolved", sorted(config.plugins)))

        @hookimpl
        def kvaware_scheduler_created(self, scheduler: Scheduler) -> None:
            seen.append("created")

        @hookimpl
        def kvaware_scheduler_started(self, scheduler: Scheduler) -> None:
            seen.append("started")

        @hookimpl
        def kvaware_scheduler_stopped(self, scheduler: Scheduler) -> None:
            seen.append("stopped")

        @hookimpl
        def kvaware_endpoints_changed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
            seen.append(("changed", [e.name for e in added], [e.name for e in removed]))

    pm = make_plugin_manager(use_env=False, plugins=[Watch()])
    s = Scheduler.from_config(config([{"type": "random-picker"}]), plugin_manager=pm)
    eps = endpoints(2)
    s.set_endpoints(eps)
    s.set_endpoints(eps)  # no change: no hook
    s.set_endpoints(eps[1:])
    s.start()
    s.start()
    s.stop()
    s.stop()
    assert seen == [
        ("resolved", ["random-picker", "single-profile-handler"]),
        "created",
        ("changed", ["pod-0", "pod-1"], []),
        ("changed", [], ["pod-0"]),
        "started",
        "stopped",
    ]


def test_config_resolved_hook_can_reject() -> None:
    """A kvaware_config_resolved implementation can veto a configuration with a ConfigError."""

    class Policy:
        @hookimpl
        def kvaware_config_resolved(self, config: Any) -> None:
            if "random-picker" in config.plugins:
                raise ConfigError("random routing is not allowed here", "plugins")

    with pytest.raises(ConfigError, match="not allowed"):
        Scheduler.from_config(
            config([{"type": "random-picker"}]),
            plugin_manager=make_plugin_manager(use_env=False, plugins=[Policy()]),
        )
