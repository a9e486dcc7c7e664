"""Benchmark reports: per-stage and overall figures of a run, tables, JSON and plots.

Per stage (requests grouped by the stage they arrived in; throughput by the stage's time
window) and overall (every stage but the warm-up): TTFT mean/p90/p99, ITL mean (token-weighted:
decode time over inter-token gaps), output tokens/s and completed requests/s inside the window,
prefix-hit rate (tokens hit at first admission / prompt tokens) next to the ideal hit rate (an
infinite cache that saw every earlier request), mean waiting queue and KV usage per pod, and the
share of requests each pod received.
"""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from kvaware_scorer.sim.fleet import RequestRecord, RunResult
from kvaware_scorer.sim.workloads import StageWindow

__all__ = [
    "BACKLOG_MARK",
    "LEGEND",
    "format_legend",
    "format_run",
    "format_summary",
    "plot_runs",
    "summarize",
    "write_json",
]


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _request_stats(records: Sequence[RequestRecord]) -> dict[str, Any]:
    served = [r for r in records if r.status == 200]
    ttfts = [r.ttft for r in served if r.ttft is not None]
    gaps = sum(max(r.output_tokens - 1, 0) for r in served)
    decode_time = sum(
        (r.finish - r.first_token)
        for r in served
        if r.finish is not None and r.first_token is not None and r.output_tokens > 1
    )
    prompt = sum(r.prompt_tokens for r in served)
    return {
        "requests": len(records),
        "completed": len(served),
        "rejected": sum(1 for r in records if r.status in (400, 503)),
        "unfinished": sum(1 for r in records if r.status == 0),
        "ttft_mean_s": _mean(ttfts),
        "ttft_p50_s": _pct(ttfts, 50),
        "ttft_p90_s": _pct(ttfts, 90),
        "ttft_p99_s": _pct(ttfts, 99),
        "itl_mean_s": decode_time / gaps if gaps else None,
        "prefix_hit_rate": sum(r.cached_tokens for r in served) / prompt if prompt else None,
        "ideal_hit_rate": sum(r.ideal_cached_tokens for r in served) / prompt if prompt else None,
        "preemptions": sum(r.preemptions for r in served),
    }


def _backlog(records: Sequence[RequestRecord], start: float) -> int:
    """Requests that arrived before `start` and still waited for their first token then."""
    return sum(
        1
        for r in records
        if r.arrival < start
        and r.status not in (400, 503)
        and (r.first_token is None or r.first_token > start)
    )


def _window_stats(
    result: RunResult, windows: Sequence[StageWindow], tokens: int, arrived: int
) -> dict[str, Any]:
    offered_duration = sum(w.duration for w in windows)
    if result.measure_ends:
        windows = [replace(w, end=result.measure_ends[w.index]) for w in windows]
    duration = sum(w.duration for w in windows)
    done = 0
    for r in result.records:
        if r.status == 200 and r.finish is not None:
            for w in windows:
                if w.start <= r.finish < w.end:
                    done += 1
                    break
    waits: list[float] = []
    kv: list[float] = []
    for t, wait, _run, usage in result.samples:
        for w in windows:
            if w.start <= t < w.end:
                waits.append(wait)
                kv.append(usage)
                break
    return {
        "output_tokens_per_s": tokens / duration if duration > 0 else None,
        "offered_requests_per_s": arrived / offered_duration if offered_duration > 0 else None,
        "requests_per_s": done / duration if duration > 0 else None,
        "waiting_queue_mean": _mean(waits),
        "kv_usage_mean": _mean(kv),
    }


def summarize(result: RunResult) -> dict[str, Any]:
    """The JSON-ready summary of one run (field names are a contract; see the module doc)."""
    by_stage: dict[int, list[RequestRecord]] = {}
    for r in result.records:
        by_stage.setdefault(r.stage, []).append(r)
    stages: list[dict[str, Any]] = []
    for w in result.stages:
        recs = by_stage.get(w.index, [])
        backlog = _backlog(result.records, w.start)
        entry: dict[str, Any] = {
            "stage": w.index,
            "name": w.name,
            "rate": w.rate,
            "start_s": w.start,
            "duration_s": w.duration,
            "warmup": w.warmup,
            "backlog_at_start": backlog,
            "backlog_carried": backlog > max(len(result.pods), 1),
        }
        entry.update(_request_stats(recs))
        entry.update(_window_stats(result, [w], result.stage_output_tokens[w.index], len(recs)))
        stages.append(entry)
    main = [w for w in result.stages if not w.warmup] or list(result.stages)
    main_idx = {w.index for w in main}
    overall_recs = [r for r in result.records if r.stage in main_idx]
    out: dict[str, Any] = {"config": result.router}
    out.update(_request_stats(overall_recs))
    out.update(
        _window_stats(
            result,
            main,
            sum(result.stage_output_tokens[w.index] for w in main),
            len(overall_recs),
        )
    )
    out["stages_with_backlog"] = sum(
        1 for s in stages if s["backlog_carried"] and s["stage"] in main_idx
    )
    out["main_stages"] = len(main)
    pods = Counter(r.pod for r in result.records if r.pod)
    total = sum(pods.values())
    out["per_pod_requests"] = {p: pods.get(p, 0) for p in result.pods}
    fair = total / len(result.pods) if result.pods and total else 0
    out["max_pod_share_vs_fair"] = (max(pods.values()) / fair) if fair else None
    hit, ideal = out.get("prefix_hit_rate"), out.get("ideal_hit_rate")
    out["hit_rate_vs_ideal"] = hit / ideal if hit is not None and ideal else None
    out["stages"] = stages
    out["drain_between_stages"] = result.drain_between_stages
    out["virtual_time_s"] = result.end_time
    out["wall_time_s"] = result.wall_time_s
    out["kv_event_payloads"] = result.payloads
    out["kv_event_bytes"] = result.payload_bytes
    out["kv_event_payloads_lost"] = result.payloads_lost
    out["sink_errors"] = result.sink_errors
    out["engine_preemptions"] = sum(s.preemptions for s in result.engine_stats.values())
    return out


# -- tables --------------------------------------------------------------------------------------


def _f(value: Any, spec: str, width: int) -> str:
    if value is None:
        return "-".rjust(width)
    return format(value, spec).rjust(width)


@dataclass(frozen=True, slots=True)
class _Column:
    name: str
    unit: str
    key: str
    spec: str
    width: int
    scale: float = 1.0


#: Every column names its unit on the header's second line.
_COLUMNS = (
    _Column("TTFT mean", "s", "ttft_mean_s", ".3f", 9),
    _Column("TTFT p90", "s", "ttft_p90_s", ".3f", 9),
    _Column("TTFT p99", "s", "ttft_p99_s", ".3f", 9),
    _Column("ITL", "ms", "itl_mean_s", ".1f", 6, 1000.0),
    _Column("output", "tok/s", "output_tokens_per_s", ".0f", 7),
    _Column("offered", "req/s", "offered_requests_per_s", ".2f", 7),
    _Column("completed", "req/s", "requests_per_s", ".2f", 9),
    _Column("hit", "%", "prefix_hit_rate", ".1f", 5, 100.0),
    _Column("ideal", "%", "ideal_hit_rate", ".1f", 5, 100.0),
    _Column("waiting", "req/pod", "waiting_queue_mean", ".1f", 9),
    _Column("KV use", "%", "kv_usage_mean", ".0f", 6, 100.0),
    _Column("done", "req", "completed", "d", 6),
)

#: Marks a stage that started with a backlog carried from the stages before it.
BACKLOG_MARK = "*"

LEGEND = (
    "TTFT: time to first token of the completed requests (mean, 90th, 99th percentile). "
    "ITL: mean time between output tokens. output: tokens generated per second inside the "
    "stage's time window. offered: requests arriving per second. completed: requests finishing "
    "per second inside the window (a backlog from earlier stages can finish here). hit: share "
    "of prompt tokens served from the prefix cache; ideal: the same for an infinite cache. "
    "waiting: mean requests queued per pod. KV use: mean KV-cache usage. done: requests "
    f"completed. overall: every stage but the warm-up. {BACKLOG_MARK} = the stage started with "
    "more than one request per pod from earlier stages still waiting for its first token: its "
    "TTFT includes that backlog (--drain-between-stages runs stages independently)."
)


def _wrap(text: str, width: int = 100) -> list[str]:
    return textwrap.wrap(text, width, subsequent_indent="    ")


def _row(label: str, entry: dict[str, Any], width: int) -> str:
    cells = [label.ljust(width)]
    for c in _COLUMNS:
        v = entry.get(c.key)
        if v is not None and c.scale != 1.0:
            v = v * c.scale
        cells.append(_f(v, c.spec, c.width))
    return " ".join(cells)


def _header(first: str, width: int, extra: Sequence[tuple[str, str, int]] = ()) -> list[str]:
    names = [first.ljust(width)] + [c.name.rjust(c.width) for c in _COLUMNS]
    units = [" " * width] + [f"({c.unit})".rjust(c.width) for c in _COLUMNS]
    for name, unit, w in extra:
        names.append(name.rjust(w))
        units.append(f"({unit})".rjust(w))
    return [" ".join(names), " ".join(units).rstrip()]


def _stage_label(stage: dict[str, Any]) -> str:
    name = str(stage["name"])
    return name + (f" {BACKLOG_MARK}" if stage.get("backlog_carried") else "")


def format_run(summary: dict[str, Any]) -> str:
    """A per-stage table of one run, with the overall row and the per-pod request shares.

    Stages marked ``*`` started with a backlog carried from earlier stages (see `LEGEND`).
    """
    width = 13
    lines = [f"== {summary['config']} ==", *_header("stage", width)]
    for s in summary["stages"]:
        lines.append(_row(_stage_label(s), s, width))
    lines.append(_row("overall", summary, width))
    pods = summary["per_pod_requests"]
    total = sum(pods.values()) or 1
    shares = "  ".join(f"{p} {100 * n / total:.1f}%" for p, n in pods.items())
    lines.append(f"per-pod share: {shares}")
    extra = (
        f"rejected {summary['rejected']}, unfinished {summary['unfinished']}, "
        f"preemptions {summary['engine_preemptions']}, KV payloads {summary['kv_event_payloads']}, "
        f"virtual {summary['virtual_time_s']:.0f} s, wall {summary['wall_time_s']:.1f} s"
    )
    lines.append(extra)
    marked = [s for s in summary["stages"] if s.get("backlog_carried")]
    if marked:
        worst = max(marked, key=lambda s: s["backlog_at_start"])
        lines.append(
            f"{BACKLOG_MARK} {len(marked)} stage(s) started with a backlog from earlier stages "
            f"(largest: {worst['backlog_at_start']} requests waiting at the start of "
            f"{worst['name']})"
        )
    return "\n".join(lines)


def format_legend() -> str:
    """The legend of the tables' columns and marks."""
    return "\n".join(_wrap("legend: " + LEGEND))


# -- the headline --------------------------------------------------------------------------------

#: Percentiles from fewer completed requests than this are not compared.
MIN_PERCENTILE_SAMPLES = 10


def _ttft_caveats(s: dict[str, Any], stat: str) -> list[str]:
    """Why the TTFT `stat` (``mean`` or ``p90``) of run `s` is degenerate, if it is."""
    out: list[str] = []
    name = s["config"]
    mean, p90 = s.get("ttft_mean_s"), s.get("ttft_p90_s")
    if stat == "p90" and mean is not None and p90 is not None and p90 < mean:
        out.append(
            f"{name}: TTFT p90 ({p90:.3f} s) is below its mean ({mean:.3f} s): a slow tail "
            f"(p99 {s.get('ttft_p99_s') or 0:.3f} s) holds most of the waiting, so the p90 "
            "describes the typical request only and the mean mostly the tail"
        )
    done = s.get("completed", 0)
    if stat == "p90" and done < MIN_PERCENTILE_SAMPLES:
        out.append(f"{name}: a p90 of only {done} completed requests")
    if s.get("unfinished"):
        out.append(
            f"{name}: {s['unfinished']} requests never got an answer and are not in its TTFT"
        )
    return out


def _factor(value: float | None) -> str:
    if value is None:
        return "-"
    return format(value, ".0f" if value >= 100 else ".1f" if value >= 10 else ".2f")


def _compare(
    value: float | None, base: float | None, lower_is_better: bool
) -> tuple[float | None, str | None]:
    """(factor, reason it cannot be computed); factor > 1 means better than the baseline."""
    if value is None or base is None:
        return None, "no data"
    if value == 0 or base == 0:
        return None, "a zero value"
    return (base / value if lower_is_better else value / base), None


def _headline(summaries: Sequence[dict[str, Any]], base: dict[str, Any], width: int) -> list[str]:
    notes: list[str] = []
    note_ids: dict[str, int] = {}

    def mark(reasons: list[str]) -> str:
        if not reasons:
            return ""
        ids = []
        for r in reasons:
            if r not in note_ids:
                note_ids[r] = len(note_ids) + 1
                notes.append(r)
            ids.append(str(note_ids[r]))
        return " [" + ",".join(ids) + "]"

    lines = _headline_header(base["config"], width)
    lines += [_headline_row(s, base, width, mark) for s in summaries]
    for i, note in enumerate(notes, 1):
        lines.extend(_wrap(f"[{i}] {note}"))
    return lines + _backlog_notes(summaries)


def _headline_header(base_name: str, width: int) -> list[str]:
    lines = _wrap(
        f"headline vs {base_name}: each factor says how many times better than {base_name} "
        "(TTFT: its time / the config's; output: the config's / its)"
    )
    lines += [
        "config".ljust(width)
        + " "
        + "TTFT mean (s)".ljust(25)
        + "TTFT p90 (s)".ljust(25)
        + "output (tok/s)".ljust(23)
        + "hit rate (%)",
    ]
    return lines


def _headline_cell(value: float | None, spec: str, w: int, factor: str) -> str:
    return (_f(value, spec, w) + factor).ljust(w + 16)


def _headline_row(
    s: dict[str, Any], base: dict[str, Any], width: int, mark: Callable[[list[str]], str]
) -> str:
    is_base = s is base
    parts = [s["config"].ljust(width)]
    for key, stat in (("ttft_mean_s", "mean"), ("ttft_p90_s", "p90")):
        factor = "" if is_base else _ttft_factor(s, base, key, stat, mark)
        parts.append(_headline_cell(s.get(key), ".3f", 9, factor))
    factor = "" if is_base else _output_factor(s, base, mark)
    parts.append(_headline_cell(s.get("output_tokens_per_s"), ".0f", 7, factor))
    parts.append(_hit_text(s, base, is_base))
    return " ".join(parts).rstrip()


def _ttft_factor(
    s: dict[str, Any], base: dict[str, Any], key: str, stat: str, mark: Callable[[list[str]], str]
) -> str:
    value, why = _compare(s.get(key), base.get(key), lower_is_better=True)
    if why is not None:
        return "  n/a" + mark([f"{s['config']}: TTFT {stat}: {why}"])
    reasons = _ttft_caveats(s, stat) + _ttft_caveats(base, stat)
    return f"  x{_factor(value)}" + mark(reasons)


def _output_factor(
    s: dict[str, Any], base: dict[str, Any], mark: Callable[[list[str]], str]
) -> str:
    value, why = _compare(s.get("output_tokens_per_s"), base.get("output_tokens_per_s"), False)
    return "  n/a" + mark([f"{s['config']}: output: {why}"]) if why else f"  x{_factor(value)}"


def _hit_text(s: dict[str, Any], base: dict[str, Any], is_base: bool) -> str:
    hit, ideal = s.get("prefix_hit_rate"), s.get("ideal_hit_rate")
    hit_txt = "-" if hit is None else f"{100 * hit:.1f}"
    if ideal:
        hit_txt += f" of {100 * ideal:.1f} ideal"
    base_hit = base.get("prefix_hit_rate")
    if not is_base and hit is not None and base_hit is not None:
        hit_txt += f" ({100 * (hit - base_hit):+.1f} points)"
    return hit_txt


def _backlog_notes(summaries: Sequence[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for s in summaries:
        n, total = s.get("stages_with_backlog", 0), s.get("main_stages", 0)
        if n:
            lines.extend(
                _wrap(
                    f"{BACKLOG_MARK} {s['config']}: {n} of {total} stages started with a backlog "
                    "carried from the stage before: its TTFT includes time spent in that queue"
                )
            )
    return lines


def format_summary(summaries: Sequence[dict[str, Any]], baseline: str | None = None) -> str:
    """One row per config (overall figures), the legend, and the headline: TTFT mean and p90,
    output throughput and hit rate against `baseline` (default: random), every factor that
    rests on a degenerate statistic flagged with a numbered note."""
    if not summaries:
        return ""
    names = [s["config"] for s in summaries]
    base_name = baseline if baseline in names else ("random" if "random" in names else names[0])
    base = summaries[names.index(base_name)]
    width = max(12, *(len(n) for n in names))
    lines = _header("config", width, [("max pod", "/fair", 8)])
    for s in summaries:
        share = s.get("max_pod_share_vs_fair")
        lines.append(_row(s["config"], s, width) + " " + _f(share, ".2f", 8))
    lines.extend(
        _wrap("legend: " + LEGEND + " max pod: the busiest pod's request count / a fair share.")
    )
    lines.append("")
    lines.extend(_headline(summaries, base, width))
    return "\n".join(lines)


def write_json(path: str | Path, summaries: Sequence[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Write ``{"runs": [...], **meta}`` to `path`."""
    doc = {"runs": list(summaries), **meta}
    Path(path).write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def plot_runs(path: str | Path, summaries: Sequence[dict[str, Any]], title: str = "") -> None:
    """Upstream-style charts: TTFT p90 and output throughput vs offered QPS, one line per config.

    Raises:
        ImportError: matplotlib is missing (``pip install kvaware-scorer[plot]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'kvaware-scorer[plot]'") from exc
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    use_rate = all(
        s["rate"] > 0 for run in summaries for s in run["stages"] if not s["warmup"]
    ) and not any(run["stages"] and run["stages"][0]["name"].startswith("t=") for run in summaries)
    for run in summaries:
        pts = [s for s in run["stages"] if not s["warmup"]]
        xs = [s["rate"] if use_rate else s["start_s"] for s in pts]
        ax1.plot(xs, [s["ttft_p90_s"] for s in pts], marker="o", label=run["config"])
        ax2.plot(xs, [s["output_tokens_per_s"] for s in pts], marker="o", label=run["config"])
    xlabel = "offered load (requests/s)" if use_rate else "time window start (s)"
    ax1.set_xlabel(xlabel)
    ax1.set_ylabel("TTFT p90 (s)")
    ax1.set_yscale("log")
    ax1.set_title("TTFT p90 vs QPS" if use_rate else "TTFT p90 over time")
    ax2.set_xlabel(xlabel)
    ax2.set_ylabel("output tokens/s")
    ax2.set_title("Throughput vs QPS" if use_rate else "Throughput over time")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110, metadata={"Title": title} if title else None)
    plt.close(fig)
