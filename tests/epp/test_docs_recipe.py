"""The five-minute recipe of ``docs/epp.md`` runs as written (on free ports)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

from .conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _recipe() -> str:
    text = (ROOT / "docs" / "epp.md").read_text()
    section = text.split("## Five minutes on one machine", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def test_the_five_minute_recipe(tmp_path: Path) -> None:
    """The documented commands (install line aside) bring up pods, ``kvaware epp`` and Envoy,
    and the two requests sharing a prefix land on the same pod."""
    script = _recipe()
    lines = script.splitlines()
    assert lines[0].startswith("pip install")
    script = "\n".join(lines[1:])
    for port in (9002, 9003, 9090, 10000, 19901):
        script = re.sub(rf"\b{port}\b", str(free_port()), script)
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ.get('PATH', '')}")
    proc = subprocess.Popen(
        ["bash", "-e", "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=150)
    finally:
        # The recipe leaves its three servers running in the background: stop that session.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    text = out.decode()
    assert proc.returncode == 0, text + (tmp_path / "epp.log").read_text()[-2000:]
    pods = re.findall(r"(?im)^x-kvaware-endpoint: (\S+)", text)
    assert len(pods) == 2 and pods[0] == pods[1], text
    assert 'inference_objective_request_total{model_name="demo/model"' in text
