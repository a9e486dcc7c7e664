"""Packaging: the wheel installs only kvaware_scorer (plugins under it), never top-level dirs,
and carries the shipped configs, the bundled trace and the built-in tokenizer."""

from __future__ import annotations

import ast
import os
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
    for init in sorted((ROOT / "kvaware_scorer").rglob("__init__.py")):
        assert init.relative_to(ROOT).as_posix() in names, f"package {init.parent} not in the wheel"
    assert "kvaware_scorer/py.typed" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheels[0]).read(entry_points).decode()
    assert "[kvaware_scorer.plugins]" in text
    assert "kvaware = kvaware_scorer.cli:main" in text

    # Package data: every config of config/, the bundled trace, the built-in tokenizer.
    for config in sorted((ROOT / "config").glob("*.yaml")):
        assert f"kvaware_scorer/data/config/{config.name}" in names, config.name
    assert "kvaware_scorer/data/traces/mooncake_synthetic_trace.jsonl" in names
    for part in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert f"kvaware_scorer/data/tokenizers/kvaware/sim/{part}" in names

    # Installed from the wheel, the resources are found inside the package.
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(wheels[0]).extractall(unpacked)
    probe = (
        "from kvaware_scorer import resources as r; "
        "print(r.config_dir()); print(sorted(r.shipped_configs())); "
        "print(r.default_trace().is_file(), (r.builtin_tokenizer() / 'tokenizer.json').is_file()); "
        "print(r.resolve_config('config/precise.yaml'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(unpacked)},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    where, configs, found, precise = out.stdout.splitlines()
    packaged = unpacked / "kvaware_scorer" / "data" / "config"
    assert Path(where) == packaged
    assert {"precise", "estimated", "load", "random"} <= set(ast.literal_eval(configs))
    assert found == "True True"
    assert Path(precise) == packaged / "precise.yaml"
