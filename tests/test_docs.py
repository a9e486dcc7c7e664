"""Every code block of README.md and docs/*.md is run: Python executed with the names it uses
defined, commands parsed by the real CLI parser (the README's recipe runs for real in
tests/test_docs_recipe.py), YAML/JSON/TOML parsed and configs validated."""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvaware_scorer import IndexerConfig
from kvaware_scorer.cli import build_parser
from kvaware_scorer.resources import config_dir, resolve_config
from kvaware_scorer.sim.wire import BlockStored, EventEncoder
from tests.conftest import RedisProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: ``text`` blocks are output, diagrams and layouts: shown, not run.
LANGS = {"python", "bash", "yaml", "json", "toml", "text"}
#: The README section whose blocks tests/test_docs_recipe.py runs against live processes.
RECIPE_SECTION = "Try it: emulated pods behind the gateway"
#: Shell scripts another test runs for real, whole, against live processes: (doc, section) ->
#: that test file (which must read the doc).
RUN_ELSEWHERE = {("epp.md", "Five minutes on one machine"): "tests/epp/test_docs_recipe.py"}
#: Commands a block may name that finish in seconds with nothing else running: run for real.
FAST_COMMANDS = {"quickstart", "validate", ("events", "decode")}
#: Tools a command line may start with besides ``kvaware``: the suite itself runs them.
CI_TOOLS = {"ruff", "mypy", "pytest"}


@dataclass(frozen=True)
class Block:
    file: Path
    line: int
    lang: str
    text: str
    section: str

    @property
    def id(self) -> str:
        return f"{self.file.name}:{self.line}"


def doc_blocks() -> list[Block]:
    """Every fenced block of the docs, with its language and the heading it sits under."""
    out: list[Block] = []
    for file in DOCS:
        lines = file.read_text(encoding="utf-8").splitlines()
        section = ""
        i = 0
        while i < len(lines):
            heading = re.match(r"^#{1,6} (.+)$", lines[i])
            if heading:
                section = heading.group(1).strip()
            fence = re.match(r"^```(\S*)\s*$", lines[i])
            if fence:
                end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
                body = "\n".join(lines[i + 1 : end]) + "\n"
                out.append(Block(file, i + 1, fence.group(1), body, section))
                i = end
            i += 1
    return out


BLOCKS = doc_blocks()


def of(lang: str, *, recipe: bool = False) -> list[Any]:
    return [
        pytest.param(b, id=b.id)
        for b in BLOCKS
        if b.lang == lang
        and (b.section == RECIPE_SECTION) == recipe
        and (b.file.name, b.section) not in RUN_ELSEWHERE
    ]


@pytest.mark.parametrize(("doc", "section"), sorted(RUN_ELSEWHERE))
def test_scripts_run_elsewhere_are_run(doc: str, section: str) -> None:
    """A script left out here is run whole by the test that names it."""
    runner = ROOT / RUN_ELSEWHERE[(doc, section)]
    text = runner.read_text(encoding="utf-8")
    assert doc in text and section in text, f"{runner.name} does not run {doc} / {section}"
    assert any(b.file.name == doc and b.section == section and b.lang == "bash" for b in BLOCKS)


def test_blocks_found() -> None:
    """The docs have blocks of every kind run here (the tests below would pass vacuously)."""
    langs = {b.lang for b in BLOCKS}
    assert {"python", "bash", "yaml"} <= langs
    assert len(BLOCKS) >= 30


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in BLOCKS])
def test_every_block_says_what_it_is(block: Block) -> None:
    """Every block is tagged: code that is run here, or ``text`` (output, diagrams)."""
    assert block.lang in LANGS, f"{block.id}: untagged or unknown block language {block.lang!r}"


# -- commands ---------------------------------------------------------------------------------


def commands(text: str) -> Iterator[list[str]]:
    """The command lines of a bash block: continuations joined, comments dropped, ``&&`` and
    a trailing ``&`` split off."""
    joined = re.sub(r"\\\n\s*", " ", text)
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        current: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", "&"):
                if current:
                    yield current
                current = []
            else:
                current.append(word)


def pyproject_extras() -> set[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(data["project"]["optional-dependencies"])


def check_kvaware(argv: list[str], produced: set[str]) -> None:
    """Parse `argv` with the real parser; every config it names must exist from any directory."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse reports the error on stderr
        raise AssertionError(f"kvaware {' '.join(argv)}: does not parse ({exc})") from None
    assert getattr(args, "func", None) is not None, f"kvaware {' '.join(argv)}: no command"
    names: list[str] = []
    for attr in ("config", "configs"):
        value = getattr(args, attr, None)
        if value is not None:
            names += [str(v) for v in (value if isinstance(value, list) else [value])]
    for name in names:
        if name.startswith("builtin:") or name in produced:
            continue
        assert resolve_config(name).is_file(), f"kvaware {' '.join(argv)}: {name} not found"
    for attr in ("endpoints_out", "json", "plot"):
        if getattr(args, attr, None):
            produced.add(str(getattr(args, attr)))
    if argv[0] in FAST_COMMANDS or tuple(argv[:2]) in FAST_COMMANDS:
        # Fast and self-contained: run it for real, from the checkout.
        out = subprocess.run(
            [sys.executable, "-m", "kvaware_scorer.cli", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, f"kvaware {' '.join(argv)}: {out.stderr[-2000:]}"


def check_command(argv: list[str], produced: set[str], *, recipe: bool) -> None:
    tool = argv[0]
    if tool == "kvaware":
        check_kvaware(argv[1:], produced)
    elif tool == "pip":
        assert argv[1] == "install", argv
        for spec in argv[2:]:
            extras = re.findall(r"\[([^\]]+)\]", spec)
            for name in ",".join(extras).split(",") if extras else []:
                assert name in pyproject_extras(), f"{spec}: no extra {name!r} in pyproject.toml"
    elif tool in CI_TOOLS:
        pass
    elif tool == "python":
        script = ROOT / argv[1]
        assert script.is_file(), argv
        out = subprocess.run(
            [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-2000:]
        for flag in (w.split("=", 1)[0] for w in argv[2:] if w.startswith("--")):
            assert flag in out.stdout, f"{script.name} has no {flag}"
    elif tool == "curl":
        assert recipe, "curl commands belong to the README recipe (run live there)"
    else:
        raise AssertionError(f"unknown command {tool!r}: teach tests/test_docs.py to run it")


@pytest.mark.parametrize("block", of("bash") + of("bash", recipe=True))
def test_bash_block_commands_parse(block: Block) -> None:
    """Every command of a bash block is one the project ships, with flags and values the real
    parser accepts and configs that resolve from any directory."""
    produced: set[str] = set()
    found = list(commands(block.text))
    assert found, f"{block.id}: no command"
    for argv in found:
        check_command(argv, produced, recipe=block.section == RECIPE_SECTION)


# -- data blocks ------------------------------------------------------------------------------


def _picker_config(plugins: Any) -> dict[str, Any]:
    return {"apiVersion": "llm-d.ai/v1alpha1", "kind": "EndpointPickerConfig", "plugins": plugins}


@pytest.mark.parametrize("block", of("yaml"))
def test_yaml_block_is_valid(block: Block, tmp_path: Path) -> None:
    """YAML blocks parse; whole scheduler configs, plugin lists and indexer sections validate."""
    from kvaware_scorer.scheduler.config import load_config
    from kvaware_scorer.scheduler.manager import Hooks, make_plugin_manager
    from kvaware_scorer.scheduler.registry import PluginRegistry

    data = yaml.safe_load(block.text)
    assert data is not None, block.id
    if isinstance(data, list) and all(isinstance(p, dict) and "type" in p for p in data):
        data = _picker_config(data)
    if isinstance(data, dict) and data.get("kind") == "EndpointPickerConfig":
        registry = PluginRegistry()
        Hooks(make_plugin_manager()).register_plugins(registry)
        file = tmp_path / "config.yaml"
        file.write_text(yaml.safe_dump(data))
        load_config(file, registry)
    elif isinstance(data, dict) and set(data) <= {
        f.alias or n for n, f in IndexerConfig.model_fields.items()
    }:
        IndexerConfig.from_dict(data)


@pytest.mark.parametrize("block", of("json"))
def test_json_block_parses(block: Block) -> None:
    """JSON blocks are JSON."""
    json.loads(block.text)


@pytest.mark.parametrize("block", of("toml"))
def test_toml_block_parses(block: Block) -> None:
    """TOML blocks are TOML."""
    tomllib.loads(block.text)


# -- Python blocks ----------------------------------------------------------------------------

#: The pods the snippets name, in the endpoints file they read (loopback: nothing leaves it).
PODS = ["10.0.0.1:8000", "10.0.0.2:8000"]
BLOCK_SIZE = 16


def _snippet_names(workdir: Path, redis_server: RedisProcess) -> dict[str, Any]:
    """The names snippets use without defining them: a vLLM KV-event frame and its sequence
    number (two stored blocks of `token_ids`), candidate pods, a Redis index and its inputs."""
    from kvaware_scorer.config import RedisIndexConfig
    from kvaware_scorer.index.redis import RedisIndex

    token_ids = list(range(1, 2 * BLOCK_SIZE + 1))
    stored = BlockStored(
        block_hashes=[111, 222],
        parent_block_hash=None,
        token_ids=token_ids,
        block_size=BLOCK_SIZE,
        lora_id=None,
        medium="GPU",
        lora_name=None,
    )
    ports = [free_port() for _ in range(2)]
    (workdir / "endpoints.yaml").write_text(
        yaml.safe_dump(
            {
                "endpoints": [
                    {"name": f"vllm-{i}", "address": "127.0.0.1", "port": p, "model": "m"}
                    for i, p in enumerate(ports)
                ]
            }
        )
    )
    index = RedisIndex(RedisIndexConfig(address=redis_server.url, key_prefix="docs:"))
    return {
        "frame_payload": EventEncoder().encode(0.0, [stored]),
        "seq": 0,
        "token_ids": token_ids,
        "pods": list(PODS),
        "index": index,
        "pod": PODS[0],
        "keys": [1, 2, 3],
        "engine_hashes": [11, 12, 13],
        "removed_hashes": [11, 12, 13],
    }


def _workdir(tmp_path: Path, text: str) -> Path:
    """A working directory like a checkout's: ``config/`` and the tokenizers a snippet reads."""
    from kvaware_scorer.tokenization import install_local_tokenizer

    (tmp_path / "config").symlink_to(config_dir())
    for model in re.findall(r'"models/([^"]+)"', text):
        install_local_tokenizer(tmp_path / "models", model)
    if "autoDiscoveryDir" in text and '"models"' in text:
        install_local_tokenizer(tmp_path / "models", "Qwen/Qwen3-32B")
    return tmp_path


async def _run(code: Any, names: dict[str, Any]) -> None:
    result = eval(code, names)
    if inspect.iscoroutine(result):
        await result


@pytest.mark.parametrize("block", of("python"))
def test_python_block_runs(
    block: Block, tmp_path: Path, redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each Python block runs as written (top-level ``await`` allowed), in a directory laid out
    like a checkout, with the names it uses but does not define given real values."""
    workdir = _workdir(tmp_path, block.text)
    monkeypatch.chdir(workdir)
    names = _snippet_names(workdir, redis_server)
    names["__name__"] = f"doc_{block.file.stem}_{block.line}"
    # NOTE: blank lines keep the traceback's line numbers those of the document.
    source = "\n" * block.line + block.text
    code = compile(
        source, str(block.file), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
    )
    try:
        asyncio.run(_run(code, names))
    finally:
        for name, method in (("scheduler", "stop"), ("indexer", "close"), ("index", "close")):
            obj = names.get(name)
            if obj is not None and hasattr(obj, method):
                getattr(obj, method)()
    os.chdir(ROOT)
