"""The README's "Try it" recipe, run as written: ``kvaware sim serve`` and ``kvaware serve`` as
real processes from a directory that is not the checkout, then its ``curl`` commands and its
``openai`` snippet against them. The one change: the gateway listens on a free port instead of
8080 (``--port`` added, the URLs rewritten), so parallel runs never collide."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, stop_process
from tests.test_docs import BLOCKS, RECIPE_SECTION, Block, commands

pytestmark = pytest.mark.slow

DEFAULT_URL = "127.0.0.1:8080"
READY_TIMEOUT = 90.0


def kvaware_argv(argv: list[str]) -> list[str]:
    """A README ``kvaware ...`` command as this interpreter runs it (the same entry point)."""
    assert argv[0] == "kvaware"
    return [sys.executable, "-m", "kvaware_scorer.cli", *argv[1:]]


class Proc:
    """A child process whose output lines are collected by a reader thread."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = READY_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} within {timeout} s; output:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        stop_process(self.proc, 15, 5)
        self._reader.join(5)


def recipe_blocks() -> list[Block]:
    found = [b for b in BLOCKS if b.file.name == "README.md" and b.section == RECIPE_SECTION]
    assert [b.lang for b in found] == ["bash", "bash", "python"], found
    return found


@pytest.fixture
def recipe_servers(tmp_path: Path) -> Iterator[tuple[int, Proc, Proc]]:
    """The first block's two commands, started in order, each once it is ready."""
    servers, _, _ = recipe_blocks()
    sim_cmd, serve_cmd = list(commands(servers.text))
    assert sim_cmd[:3] == ["kvaware", "sim", "serve"] and serve_cmd[:2] == ["kvaware", "serve"]
    port = free_port()
    started: list[Proc] = []
    try:
        sim = Proc(kvaware_argv(sim_cmd), tmp_path)
        started.append(sim)
        sim.wait_for("pods ready")
        gateway = Proc(kvaware_argv([*serve_cmd, "--port", str(port)]), tmp_path)
        started.append(gateway)
        gateway.wait_for("kvaware gateway listening on")
        yield port, sim, gateway
    finally:
        for proc in reversed(started):
            proc.stop()


def test_readme_recipe_serves_text_and_chat(recipe_servers: tuple[int, Proc, Proc]) -> None:
    """The README's two commands serve text prompts and chat out of the box, to its curl
    commands and its openai snippet, and the gateway tokenizes them (no tokenizer warning,
    no traceback)."""
    port, sim, gateway = recipe_servers
    _, calls, snippet = recipe_blocks()
    url = f"127.0.0.1:{port}"
    answers = []
    for argv in commands(calls.text):
        assert argv[0] == "curl"
        argv = [a.replace(DEFAULT_URL, url) for a in argv]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        answers.append(json.loads(out.stdout))
    text, chat = answers
    assert text["object"] == "text_completion" and text["choices"][0]["text"].strip()
    assert text["usage"]["prompt_tokens"] > 1
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["content"].strip()

    stdout = io.StringIO()
    code = compile(snippet.text.replace(DEFAULT_URL, url), "README.md", "exec")
    with contextlib.redirect_stdout(stdout):
        exec(code, {"__name__": "readme_recipe"})
    assert stdout.getvalue().strip()

    # The gateway tokenizes text exactly as the pods do: after one request, the pod's KV events
    # make the same text score on that pod (the precise scorer keys the gateway's tokens).
    body = {"model": "kvaware/sim", "prompt": "The quick brown fox jumps. " * 30, "max_tokens": 1}
    post(url, "/v1/completions", body)
    deadline = time.monotonic() + 30
    best = 0.0
    while best <= 0.0 and time.monotonic() < deadline:
        explained = post(url, "/v1/score", body)
        assert not explained.get("errors"), explained
        best = max(explained["scores"]["precise-prefix-cache-scorer"].values(), default=0.0)
        time.sleep(0.1)
    assert best > 0.9, explained
    logs = "\n".join(gateway.lines + sim.lines)
    assert "Traceback" not in logs and "no tokenizer" not in logs, logs
    assert "PyTorch" not in logs, logs


def post(url: str, path: str, body: dict[str, object]) -> dict[str, object]:
    req = urllib.request.Request(
        f"http://{url}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        data: dict[str, object] = json.loads(resp.read())
    return data
