"""``kvaware demo --via envoy`` (reduced sizes): precise beats random through Envoy + the EPP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvaware_scorer.cli import main

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def test_demo_via_envoy_precise_beats_random(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both configs run on fresh pods behind Envoy + kvaware epp; every request is served and
    precise gets a far higher prefix-hit rate than random."""
    out = tmp_path / "demo.json"
    rc = main(
        ["demo", "--via", "envoy", "--pods", "3", "--groups", "6", "--prompts-per-group", "3",
         "--system-words", "500", "--question-words", "20", "--output-tokens", "8",
         "--requests", "120", "--concurrency", "8", "--speedup", "4", "--timeout", "100",
         "--json", str(out)]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "through Envoy + kvaware epp" in text
    runs = {r["config"]: r for r in json.loads(out.read_text())["runs"]}
    precise, rand = runs["precise"], runs["random"]
    for r in (precise, rand):
        assert r["completed"] == 120 and r["rejected"] == 0 and r["unfinished"] == 0
        assert sum(r["per_pod_requests"].values()) == 120
    assert precise["prefix_hit_rate"] > 0.8
    assert precise["prefix_hit_rate"] > rand["prefix_hit_rate"] + 0.3
