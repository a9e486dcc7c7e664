"""The benchmark report: units and legend, offered vs completed, backlog marks, independent
stages, a headline that flags degenerate statistics, the plot title and the progress ETA."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from kvaware_scorer.cli import main
from kvaware_scorer.sim import progress as progress_module
from kvaware_scorer.sim.fleet import FleetConfig, FleetSimulator, RunResult
from kvaware_scorer.sim.report import format_run, format_summary, summarize
from kvaware_scorer.sim.routing import RandomRouter
from kvaware_scorer.sim.workloads import LoadStage, SharedPrefixWorkload

from .helpers import small_profile


def _overload(output_len: int = 200) -> SharedPrefixWorkload:
    """One pod, no shared prefixes, 40 req/s after a 20 req/s warm-up: a queue builds up."""
    return SharedPrefixWorkload(
        num_groups=200,
        num_prompts_per_group=1,
        system_prompt_len=4000,
        question_len=200,
        output_len=output_len,
        load=[LoadStage(20, 2.0), LoadStage(40, 2.0), LoadStage(2, 2.0)],
        vocab_size=32000,
        seed=0,
    )


def _run(drain: bool, progress: bool = False, output_len: int = 200) -> RunResult:
    fleet = FleetConfig(
        profile=small_profile(16),
        num_pods=1,
        num_gpu_blocks=2000,
        drain_between_stages=drain,
    )
    return FleetSimulator(fleet).run(_overload(output_len), RandomRouter(0), progress=progress)


def test_every_header_has_a_unit_and_the_summary_a_legend() -> None:
    """Both tables print a unit under every column, and the summary ends with a legend."""
    summary = summarize(_run(drain=False))
    run_lines = format_run(summary).splitlines()
    names, units = run_lines[1], run_lines[2]
    assert "offered" in names and "completed" in names
    columns = names.split()
    assert units.split() == [
        "(s)", "(s)", "(s)", "(ms)", "(tok/s)", "(req/s)", "(req/s)", "(%)", "(%)", "(req/pod)",
        "(%)", "(req)",
    ]  # fmt: skip
    assert columns[0] == "stage"
    text = format_summary([summary])
    assert "(req/pod)" in text and "legend: TTFT: time to first token" in text
    assert "offered: requests arriving per second" in text


def test_offered_and_completed_rates_are_separate_columns() -> None:
    """offered = arrivals per second of the stage; completed = completions inside its window."""
    res = _run(drain=False)
    summary = summarize(res)
    for stage, window in zip(summary["stages"], res.stages, strict=True):
        arrived = sum(1 for r in res.records if r.stage == window.index)
        assert stage["offered_requests_per_s"] == pytest.approx(arrived / window.duration)
    busy = summary["stages"][1]
    # Overloaded: far more arrives than completes.
    assert busy["offered_requests_per_s"] > 5 * busy["requests_per_s"]


def test_stages_starting_with_a_backlog_are_marked() -> None:
    """A stage that inherits a queue from earlier stages is marked in the JSON and the table."""
    summary = summarize(_run(drain=False))
    stages = summary["stages"]
    assert stages[0]["backlog_at_start"] == 0 and not stages[0]["backlog_carried"]
    assert stages[1]["backlog_carried"] and stages[2]["backlog_carried"]
    assert stages[2]["backlog_at_start"] > stages[1]["backlog_at_start"] > 1
    rows = format_run(summary).splitlines()
    assert any(row.startswith("qps=40 *") for row in rows)
    assert any(row.startswith("qps=2 *") for row in rows)
    assert "2 stage(s) started with a backlog" in format_run(summary)
    assert "2 of 2 stages started with a backlog" in format_summary([summary])


def test_drain_between_stages_makes_stages_independent() -> None:
    """With draining, each stage starts after every earlier request finished, no stage is
    marked, and the last stage's TTFT no longer carries the queue."""
    queued = summarize(_run(drain=False))
    res = _run(drain=True)
    drained = summarize(res)
    for k, window in enumerate(res.stages[1:], 1):
        earlier = [r for r in res.records if r.stage < k]
        assert all(r.finish is not None and r.finish <= window.start for r in earlier)
        mine = [r for r in res.records if r.stage == k]
        assert mine and min(r.arrival for r in mine) >= window.start
    assert not any(s["backlog_carried"] for s in drained["stages"])
    assert drained["stages_with_backlog"] == 0 and drained["drain_between_stages"]
    assert drained["stages"][2]["start_s"] > queued["stages"][2]["start_s"]
    assert drained["stages"][2]["ttft_mean_s"] < 0.1 * queued["stages"][2]["ttft_mean_s"]
    # The same requests, only later: every one is served either way.
    assert drained["completed"] == queued["completed"] == queued["requests"]
    # A stage's drain counts as its own: its output is all inside its measurement window.
    assert sum(res.stage_output_tokens) == sum(r.output_tokens for r in res.records)


def _summary(name: str, **values: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "config": name,
        "ttft_mean_s": 1.0,
        "ttft_p90_s": 2.0,
        "ttft_p99_s": 3.0,
        "output_tokens_per_s": 1000.0,
        "prefix_hit_rate": 0.5,
        "ideal_hit_rate": 0.9,
        "completed": 100,
        "unfinished": 0,
        "stages_with_backlog": 0,
        "main_stages": 4,
    }
    base.update(values)
    return base


def _headline(text: str) -> list[str]:
    return text.split("headline vs ")[1].splitlines()


def test_headline_compares_mean_p90_throughput_and_hit_rate() -> None:
    """The headline gives TTFT mean and p90, throughput and hit rate factors, with no note
    when every statistic is sound."""
    base = _summary("random", ttft_mean_s=10.0, ttft_p90_s=20.0, output_tokens_per_s=500.0)
    good = _summary("precise", prefix_hit_rate=0.85)
    lines = _headline(format_summary([base, good]))
    row = next(line for line in lines if line.startswith("precise"))
    assert re.search(r"1\.000\s+x10\.0\s+2\.000\s+x10\.0\s+1000\s+x2\.00\s+85\.0 of 90\.0", row)
    assert "(+35.0 points)" in row
    assert not any(line.startswith("[") for line in lines)


def test_headline_flags_a_p90_below_the_mean() -> None:
    """A factor from a run whose p90 is below its mean carries a numbered note saying so."""
    base = _summary("random", ttft_mean_s=112.0, ttft_p90_s=185.0, ttft_p99_s=200.0)
    skewed = _summary("precise", ttft_mean_s=1.408, ttft_p90_s=0.160, ttft_p99_s=21.2)
    lines = _headline(format_summary([base, skewed]))
    row = next(line for line in lines if line.startswith("precise"))
    assert re.search(r"0\.160\s+x1156 \[1\]", row)
    assert "x79.5" in row and "x79.5 [" not in row  # the mean factor itself is not flagged
    note = " ".join(lines[lines.index(next(x for x in lines if x.startswith("[1]"))) :])
    assert "TTFT p90 (0.160 s) is below its mean (1.408 s)" in note


def test_headline_never_divides_by_a_zero_or_missing_baseline() -> None:
    """A zero or missing baseline gives n/a with a note instead of a ratio."""
    base = _summary("random", output_tokens_per_s=0.0, ttft_mean_s=None, ttft_p90_s=None)
    other = _summary("precise")
    lines = _headline(format_summary([base, other]))
    row = next(line for line in lines if line.startswith("precise"))
    assert row.count("n/a") == 3 and "x" not in row.split("precise", 1)[1].split("%")[0]
    notes = "\n".join(line for line in lines if line.startswith("["))
    assert "precise: output: a zero value" in notes and "precise: TTFT mean: no data" in notes


def test_headline_flags_small_samples_and_unfinished_requests() -> None:
    """A p90 of few requests, and TTFTs that leave out unanswered requests, are flagged."""
    base = _summary("random")
    few = _summary("few", completed=4, unfinished=3)
    lines = _headline(format_summary([base, few]))
    notes = "\n".join(line for line in lines if line.startswith("["))
    assert "a p90 of only 4 completed requests" in notes
    assert "3 requests never got an answer" in notes


def test_plot_title_names_workload_quick_and_seed(tmp_path: Path) -> None:
    """The chart's title (drawn and stored in the PNG) carries workload, --quick and seed."""
    from PIL import Image

    png = tmp_path / "out.png"
    rc = main(
        ["bench", "--quick", "--stages", "10:3,20:3", "--seed", "7", "--configs",
         "builtin:random", "--groups", "10", "--prompts-per-group", "2", "--system-prompt-len",
         "500", "--question-len", "100", "--output-len", "20", "--pods", "2", "--no-progress",
         "--drain-between-stages", "--plot", str(png)]
    )  # fmt: skip
    assert rc == 0
    with Image.open(png) as image:
        title = image.text["Title"]  # type: ignore[attr-defined]
    assert title == ("shared-prefix --quick --drain-between-stages, seed 7: 2 x qwen3-32b-2xh100")


def test_progress_eta_is_sane_from_the_first_request(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bar's first time estimate is of the order of the run's real length, not hours."""
    monkeypatch.setattr(progress_module, "PROGRESS_INTERVAL_S", 0.0)
    t0 = time.perf_counter()
    _run(drain=False, progress=True, output_len=2000)
    wall = time.perf_counter() - t0
    err = capsys.readouterr().err
    etas = re.findall(r"\[(\d\d):(\d\d)<(\d\d):(\d\d)", err)
    assert etas, err[-500:]
    first = int(etas[0][2]) * 60 + int(etas[0][3])
    assert first <= max(3.0, 3 * wall), (first, wall)
    assert "routed" in err and "done" in err
