"""The ``kvaware`` command line as a new user meets it: --version, each command's own help with
every flag's default, one line naming a missing extra, no third-party noise, and commands that
work from any directory."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

import kvaware_scorer
from kvaware_scorer.cli import build_parser, main
from kvaware_scorer.extras import DISTRIBUTIONS, EXTRAS
from kvaware_scorer.resources import config_dir, default_trace, shipped_configs
from kvaware_scorer.sim.cli import bench_configs

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--groups", "3", "--prompts-per-group", "2", "--system-prompt-len", "256",
    "--question-len", "64", "--output-len", "16", "--stages", "5:2", "--pods", "2",
    "--no-progress",
]  # fmt: skip

# A sitecustomize that makes every module of an extra unimportable, as on a base install.
_BLOCKER = """
import sys

BLOCKED = {blocked!r}


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
"""


def subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command parser with its words, e.g. ``("sim", "serve")``."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subcommands(sub, (*path, name))


COMMANDS = [p for p, _ in subcommands(build_parser()) if p]


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}
    full_env["PYTHONPATH"] = os.pathsep.join(
        [*(env or {}).get("PYTHONPATH", "").split(os.pathsep), str(ROOT)]
    ).strip(os.pathsep)
    full_env.update({k: v for k, v in (env or {}).items() if k != "PYTHONPATH"})
    return subprocess.run(
        [sys.executable, "-m", "kvaware_scorer.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """``kvaware --version`` prints the installed version, the one pyproject declares."""
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert (
        capsys.readouterr().out.strip()
        == f"kvaware {declared}"
        == (f"kvaware {kvaware_scorer.__version__}")
    )


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(p) for p in COMMANDS])
def test_each_command_help_is_its_own(
    words: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    """``kvaware CMD --help`` shows CMD's usage and no other command's."""
    with pytest.raises(SystemExit) as info:
        main([*words, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: kvaware {' '.join(words)} ")
    assert text.count("usage:") == 1
    others = [" ".join(c) for c in COMMANDS if c[: len(words)] != words]
    examples = [line.strip() for line in text.splitlines()]
    for other in others:
        shown = [
            e for e in examples if e.startswith(f"kvaware {other} ") or e == f"kvaware {other}"
        ]
        assert not shown, f"{' '.join(words)} --help shows how to run {other}: {shown}"


def test_every_flag_has_help_with_its_default() -> None:
    """Every option of every command has a help line; one with a default shows it."""
    missing = []
    for words, parser in subcommands(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or action.dest in ("help", "version"):
                continue
            name = " ".join(["kvaware", *words, *(action.option_strings or [action.dest])])
            if not action.help:
                missing.append(f"{name}: no help")
                continue
            no_default = action.default is None or action.default is False or action.default == []
            if not action.option_strings or no_default:
                continue
            shown = formatter._expand_help(action)
            if "default" not in shown:
                missing.append(f"{name}: default {action.default!r} not shown")
    assert not missing, "\n".join(missing)


def test_extras_table_matches_pyproject() -> None:
    """`EXTRAS` lists exactly pyproject's optional dependencies (meta extras aside), module for
    distribution."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {
        name: sorted(d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in deps)
        for name, deps in data["optional-dependencies"].items()
        if name not in ("all", "dev")
    }
    dists = {k: sorted(DISTRIBUTIONS.get(m, m) for m in v) for k, v in EXTRAS.items()}
    assert dists == declared
    readme = (ROOT / "README.md").read_text()
    for name in data["optional-dependencies"]:
        assert f"| `{name}` |" in readme, f"extra {name} not in the README's extras table"


@pytest.fixture
def base_install(tmp_path: Path) -> dict[str, str]:
    """An environment where no extra is importable (a base install)."""
    site = tmp_path / "site"
    site.mkdir()
    blocked = sorted({m for mods in EXTRAS.values() for m in mods})
    (site / "sitecustomize.py").write_text(_BLOCKER.format(blocked=blocked))
    return {"PYTHONPATH": str(site)}


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["sim", "serve", "--pods", "1"],
            "kvaware sim serve needs the 'gateway' and 'tokenizers' extras: "
            "pip install 'kvaware-scorer[gateway,tokenizers]'",
        ),
        (
            ["serve", "--config", "precise", "--endpoints", "endpoints.yaml"],
            "kvaware serve needs the 'gateway' extra: pip install 'kvaware-scorer[gateway]'",
        ),
        (
            ["demo", "--quick"],
            "kvaware demo needs the 'gateway' and 'tokenizers' extras: "
            "pip install 'kvaware-scorer[gateway,tokenizers]'",
        ),
        (
            ["bench", "--configs", "builtin:random", "--plot", "out.png", *TINY],
            "kvaware bench --plot needs the 'plot' extra: pip install 'kvaware-scorer[plot]'",
        ),
    ],
    ids=["sim-serve", "serve", "demo", "bench-plot"],
)
def test_missing_extra_is_one_line(
    args: list[str], line: str, base_install: dict[str, str], tmp_path: Path
) -> None:
    """On a base install a command needing an extra prints one line naming it, exits 1."""
    out = run_cli(*args, cwd=tmp_path, env=base_install)
    assert out.returncode == 1, out.stderr
    assert out.stderr.splitlines() == [line]
    assert out.stdout == ""


def test_base_install_runs_what_needs_no_extra(
    base_install: dict[str, str], tmp_path: Path
) -> None:
    """Without any extra, help, validate and a small benchmark of the precise config run."""
    for words in COMMANDS:
        out = run_cli(*words, "--help", cwd=tmp_path, env=base_install)
        assert out.returncode == 0, (words, out.stderr)
    out = run_cli("validate", "precise", cwd=tmp_path, env=base_install)
    assert out.returncode == 0, out.stderr
    out = run_cli("bench", "--configs", "precise", "random", *TINY, cwd=tmp_path, env=base_install)
    assert out.returncode == 0, out.stderr
    assert "precise" in out.stdout and "random" in out.stdout


def test_cli_imports_every_command_and_no_extra(tmp_path: Path) -> None:
    """Importing the CLI imports each subcommand's module (a graph static tools can follow) and
    no module of any extra, so a base install can build the parser."""
    blocked = sorted({m for mods in EXTRAS.values() for m in mods})
    code = (
        "import sys, kvaware_scorer.cli as c\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {blocked!r}))\n"
        "print(sorted(m.__name__ for m in c._COMMANDS))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=60, check=True,
    )  # fmt: skip
    extras_loaded, commands = out.stdout.splitlines()
    assert extras_loaded == "[]"
    assert commands == str(
        sorted(
            [
                "kvaware_scorer.epp.cli",
                "kvaware_scorer.events.cli",
                "kvaware_scorer.gateway.serve",
                "kvaware_scorer.scheduler.validate",
                "kvaware_scorer.sim.cli",
                "kvaware_scorer.tours.demo",
                "kvaware_scorer.tours.quickstart",
            ]
        )
    )


def test_moved_tours_keep_their_old_import_paths() -> None:
    """``kvaware_scorer.demo`` and ``kvaware_scorer.quickstart`` re-export the tours' names."""
    from kvaware_scorer import demo, quickstart
    from kvaware_scorer.tours import demo as tour_demo
    from kvaware_scorer.tours import quickstart as tour_quickstart

    for old, new in ((demo, tour_demo), (quickstart, tour_quickstart)):
        assert old.__all__ and set(old.__all__) <= set(new.__all__)
        for name in old.__all__:
            assert getattr(old, name) is getattr(new, name), name


def test_cli_has_no_third_party_noise(tmp_path: Path) -> None:
    """Loading a tokenizer on the CLI prints nothing from transformers (no PyTorch advice)."""
    out = run_cli("sim", "serve", "--pods", "1", "--duration", "0.5", cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pods ready" in out.stdout
    assert out.stderr == "", out.stderr


def test_shipped_configs_are_every_scheduler_yaml_of_config_dir() -> None:
    """Every EndpointPickerConfig YAML dropped into config/ is a shipped config (no list in
    code), and bench runs them all without --configs."""
    expected = sorted(
        p.stem for p in (ROOT / "config").glob("*.yaml") if "EndpointPickerConfig" in p.read_text()
    )
    assert config_dir().resolve() == (ROOT / "config").resolve()
    assert sorted(shipped_configs()) == expected
    assert {"precise", "estimated", "load", "random"} <= set(expected)
    assert [Path(p).stem for p in bench_configs(None)] == expected
    named = bench_configs(["precise", "config/random.yaml", "builtin:oracle"])
    assert [Path(n).resolve() for n in named[:2]] == [
        (config_dir() / "precise.yaml").resolve(),
        (config_dir() / "random.yaml").resolve(),
    ]
    assert named[2] == "builtin:oracle"


def test_bench_works_from_any_directory(tmp_path: Path) -> None:
    """``kvaware bench`` with shipped names and README-style paths, and ``--workload trace`` with
    the bundled trace, run from a directory that is not the checkout."""
    out = run_cli(
        "bench", "--configs", "precise", "config/random.yaml", "--json", "out.json", *TINY,
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    names = [run["config"] for run in json.loads((tmp_path / "out.json").read_text())["runs"]]
    assert names == ["precise", "random"]
    assert default_trace().is_file()
    out = run_cli(
        "bench", "--workload", "trace", "--quick", "--max-requests", "30", "--configs", "random",
        "--pods", "2", "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr


def test_demo_configs_resolve_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``kvaware demo``'s default configs (shipped names) load from a directory that is not
    the checkout, with the demo's tokenizer root filled in."""
    from kvaware_scorer.tours.demo import DemoSettings, scheduler_config

    monkeypatch.chdir(tmp_path)
    for name in DemoSettings().configs:
        data = scheduler_config(name, tmp_path / "tokenizers")
        assert data["kind"] == "EndpointPickerConfig"
    precise = scheduler_config("config/precise.yaml", tmp_path / "tok")
    pools = [
        p["parameters"]["tokenizersPoolConfig"]["local"]["autoDiscoveryDir"]
        for p in precise["plugins"]
        if p.get("type") == "precise-prefix-cache-scorer"
    ]
    assert pools == [str(tmp_path / "tok")]
