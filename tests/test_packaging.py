"""Packaging: the wheel installs only kvaware_scorer (plugins under it), never top-level dirs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_has_no_top_level_helper_packages(tmp_path: Path) -> None:
    """The built wheel holds kvaware_scorer/ (with plugins/) and no plugins/config/tests/benchmarks."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    wheels = list(tmp_path.glob("kvaware_scorer-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert not tops & {"plugins", "config", "tests", "benchmarks"}
    assert any(n.startswith("kvaware_scorer/plugins/") for n in names)
    assert "kvaware_scorer/py.typed" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheels[0]).read(entry_points).decode()
    assert "[kvaware_scorer.plugins]" in text
    assert "kvaware = kvaware_scorer.cli:main" in text
