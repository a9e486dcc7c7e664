"""``kvaware validate``: the resolved profile or every error (exit status 1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kvaware_scorer.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_validate_prints_resolved_profile(capsys: pytest.CaptureFixture[str]) -> None:
    """A valid config prints its profile with weights, injected plugins and parameter defaults."""
    assert main(["validate", str(ROOT / "config" / "precise.yaml")]) == 0
    out = capsys.readouterr().out
    assert "profile default:" in out
    assert "filters: decode-filter" in out
    assert "precise-prefix-cache-scorer" in out and "weight 3" in out
    assert "active-request-scorer" in out and "weight 1" in out
    assert (
        "single-profile-handler [injected]" in out
        or "single-profile-handler (single-profile-handler) [injected]" in out
    )
    assert "speculativeTTL: 2.0" in out
    assert "requestTimeout: 300.0" in out


def test_validate_resolved_yaml_loads_back(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--resolved-yaml prints a complete config that validates again."""
    assert main(["validate", "--resolved-yaml", str(ROOT / "config" / "estimated.yaml")]) == 0
    text = capsys.readouterr().out
    data = yaml.safe_load(text)
    assert data["kind"] == "EndpointPickerConfig"
    f = tmp_path / "resolved.yaml"
    f.write_text(text)
    assert main(["validate", str(f)]) == 0


def test_validate_reports_every_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """An invalid config exits 1 and lists each error with its YAML path."""
    f = tmp_path / "bad.yaml"
    f.write_text(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
        "  - type: load-aware-scorer\n    parameters: {depth: 3}\n"
        "  - type: precise-prefix-cache-scorer\n    parameters: {speculativeTTL: soon}\n"
        "schedulingProfiles:\n  - name: default\n    plugins:\n      - pluginRef: queue\n"
    )
    assert main(["validate", str(f)]) == 1
    err = capsys.readouterr().err
    assert "3 error(s)" in err
    assert "plugins[0].parameters.depth: unknown key" in err
    assert "plugins[1].parameters.speculativeTTL" in err
    assert "schedulingProfiles[0].plugins[0].pluginRef" in err


def test_validate_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A missing file is an error, not a traceback."""
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err
