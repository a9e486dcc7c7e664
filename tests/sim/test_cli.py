"""``kvaware bench``: the CLI runs configs end to end and writes the JSON contract and a plot."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from kvaware_scorer.cli import main
from kvaware_scorer.sim.routing import make_router

SMALL = [
    "--groups", "40", "--prompts-per-group", "3", "--system-prompt-len", "2000",
    "--question-len", "200", "--output-len", "60", "--stages", "10:6,20:6", "--pods", "4",
    "--no-progress",
]  # fmt: skip


def test_bench_with_builtin_routers_writes_json_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A small shared-prefix bench prints tables and writes the contract JSON fields and a PNG."""
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    t0 = time.perf_counter()
    rc = main(
        ["bench", "--workload", "shared-prefix", "--configs", "builtin:random", "builtin:oracle",
         "--json", str(out), "--plot", str(png), *SMALL]
    )  # fmt: skip
    assert rc == 0 and time.perf_counter() - t0 < 60
    text = capsys.readouterr().out
    assert "== random ==" in text and "== oracle ==" in text and "headline vs random" in text
    doc = json.loads(out.read_text())
    runs = {r["config"]: r for r in doc["runs"]}
    assert set(runs) == {"random", "oracle"}
    for r in runs.values():
        for key in (
            "ttft_mean_s", "ttft_p90_s", "output_tokens_per_s", "prefix_hit_rate",
            "ideal_hit_rate", "per_pod_requests", "stages",
        ):  # fmt: skip
            assert key in r
        assert len(r["per_pod_requests"]) == 4
        assert sum(r["per_pod_requests"].values()) == sum(s["requests"] for s in r["stages"])
        assert r["requests"] == r["stages"][1]["requests"]  # overall excludes the warm-up
        assert [s["name"] for s in r["stages"]] == ["warmup", "qps=20"]
    assert runs["oracle"]["prefix_hit_rate"] > runs["random"]["prefix_hit_rate"]
    assert doc["profile"]["name"] == "qwen3-32b-2xh100" and doc["fleet"]["num_pods"] == 4
    assert png.stat().st_size > 10_000


def test_multi_turn_and_trace_workloads_run(tmp_path: Path) -> None:
    """The multi-turn and trace workloads run through the CLI and report every request."""
    out = tmp_path / "mt.json"
    rc = main(
        ["bench", "--workload", "multi-turn", "--configs", "builtin:round-robin", "--stages", "2:5",
         "--turns", "3", "--answer-len", "30", "--think-time", "1", "--pods", "2", "--no-progress",
         "--json", str(out)]
    )  # fmt: skip
    assert rc == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["completed"] == run["requests"] and run["requests"] % 3 == 0
    trace = Path(__file__).resolve().parents[2] / "benchmarks/traces/mooncake_synthetic_trace.jsonl"
    out2 = tmp_path / "tr.json"
    rc = main(
        ["bench", "--workload", "trace", "--trace", str(trace), "--max-requests", "60",
         "--configs", "builtin:oracle", "--pods", "2", "--max-model-len", "131072",
         "--no-progress", "--json", str(out2)]
    )  # fmt: skip
    assert rc == 0
    run2 = json.loads(out2.read_text())["runs"][0]
    assert run2["requests"] == 60 and run2["completed"] + run2["rejected"] == 60


def test_bad_configs_fail_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown built-ins and missing YAML files exit 2 with a message naming them."""
    assert main(["bench", "--configs", "builtin:nope", "--no-progress", *SMALL[:-1]]) == 2
    assert "builtin:nope" in capsys.readouterr().err
    missing = str(tmp_path / "none.yaml")
    assert main(["bench", "--configs", missing, "--no-progress"]) == 2
    assert "none.yaml" in capsys.readouterr().err
    with pytest.raises(Exception, match="valid"):
        make_router("builtin:zzz", clock=lambda: 1.0, seed=0, model="m")


def test_real_quick_ladder_runs_in_bounded_time(capsys: pytest.CaptureFixture[str]) -> None:
    """The actual --quick shared-prefix run (150 groups, 8 pods) finishes well within a minute."""
    t0 = time.perf_counter()
    assert main(["bench", "--quick", "--configs", "builtin:oracle", "--no-progress"]) == 0
    assert time.perf_counter() - t0 < 60
    text = capsys.readouterr().out
    assert "qps=60" in text and "8 x qwen3-32b-2xh100" in text


def test_plot_without_matplotlib_fails_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--plot without matplotlib installed exits 1 with the install hint before any run."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an absent package looks like
    out = tmp_path / "out.json"
    rc = main(
        ["bench", "--configs", "builtin:random", "--json", str(out), "--plot",
         str(tmp_path / "p.png"), *SMALL]
    )  # fmt: skip
    assert rc == 1 and "kvaware-scorer[plot]" in capsys.readouterr().err
    assert not out.exists()
