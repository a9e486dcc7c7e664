"""docs/plugins.md documents every hook and every built-in type with its parameters."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from kvaware_scorer.scheduler import PluginRegistry, PluginSpec, hookspecs

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def sections() -> dict[str, str]:
    """Level-3 heading line -> the text up to the next heading."""
    text = DOC.read_text()
    out: dict[str, str] = {}
    parts = re.split(r"^### (.+)$", text, flags=re.M)
    for head, body in zip(parts[1::2], parts[2::2], strict=True):
        out[head] = body
    return out


def section_for(name: str) -> str:
    found = [
        body for head, body in sections().items() if f"`{name}`" in head or f"`{name}(" in head
    ]
    assert found, f"{name} is not documented in {DOC.name}"
    return found[0]


HOOKS = sorted(
    n for n, f in vars(hookspecs).items() if n.startswith("kvaware_") and inspect.isfunction(f)
)


def test_hooks_found() -> None:
    """The hook list is not empty (the test below would pass vacuously)."""
    assert len(HOOKS) >= 5


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_documented_with_signature(hook: str) -> None:
    """Each hook has a section whose heading shows its signature, saying when it fires."""
    args = list(inspect.signature(getattr(hookspecs, hook)).parameters)
    heading = next((h for h in sections() if h.startswith(f"`{hook}(")), None)
    assert heading is not None, f"hook {hook} is not documented"
    assert heading == f"`{hook}({', '.join(args)})`"
    assert "Fires" in section_for(hook)


def builtin_specs(registry: PluginRegistry) -> list[PluginSpec]:
    return [s for s in registry.specs() if s.source.startswith("kvaware_scorer.plugins")]


def test_every_builtin_type_documented(registry: PluginRegistry) -> None:
    """Every built-in type has a section naming its roles and parameters, with a YAML example."""
    specs = builtin_specs(registry)
    assert len(specs) >= 20
    for spec in specs:
        body = section_for(spec.type)
        assert "```yaml" in body, f"{spec.type}: no example"
        if spec.kinds:
            assert "Roles:" in body, f"{spec.type}: roles not stated"
        params_body = body
        same = re.search(r"Parameters: as `([^`]+)`", body)
        if same:
            params_body = section_for(same.group(1))
        for name, field in spec.params.model_fields.items():
            key = field.alias or name
            if not spec.kinds:  # inert upstream types take any parameters
                continue
            assert f"`{key}`" in params_body, f"{spec.type}: parameter {key} undocumented"
        for old in spec.param_aliases:
            assert f"`{old}`" in body, f"{spec.type}: deprecated parameter {old} undocumented"


def test_every_alias_documented(registry: PluginRegistry) -> None:
    """Every deprecated type name appears in its current type's section."""
    for old, new in registry.aliases().items():
        assert f"`{old}`" in section_for(new), f"alias {old} undocumented"
