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
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvaware_scorer.sim.fleet import RequestRecord, RunResult
from kvaware_scorer.sim.workloads import StageWindow

__all__ = ["format_run", "format_summary", "plot_runs", "summarize", "write_json"]


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


def _window_stats(result: RunResult, windows: Sequence[StageWindow], tokens: int) -> dict[str, Any]:
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
        entry: dict[str, Any] = {
            "stage": w.index,
            "name": w.name,
            "rate": w.rate,
            "start_s": w.start,
            "duration_s": w.duration,
            "warmup": w.warmup,
        }
        entry.update(_request_stats(recs))
        entry.update(_window_stats(result, [w], result.stage_output_tokens[w.index]))
        stages.append(entry)
    main = [w for w in result.stages if not w.warmup] or list(result.stages)
    main_idx = {w.index for w in main}
    overall_recs = [r for r in result.records if r.stage in main_idx]
    out: dict[str, Any] = {"config": result.router}
    out.update(_request_stats(overall_recs))
    out.update(_window_stats(result, main, sum(result.stage_output_tokens[w.index] for w in main)))
    pods = Counter(r.pod for r in result.records if r.pod)
    total = sum(pods.values())
    out["per_pod_requests"] = {p: pods.get(p, 0) for p in result.pods}
    fair = total / len(result.pods) if result.pods and total else 0
    out["max_pod_share_vs_fair"] = (max(pods.values()) / fair) if fair else None
    hit, ideal = out.get("prefix_hit_rate"), out.get("ideal_hit_rate")
    out["hit_rate_vs_ideal"] = hit / ideal if hit is not None and ideal else None
    out["stages"] = stages
    out["virtual_time_s"] = result.end_time
    out["wall_time_s"] = result.wall_time_s
    out["kv_event_payloads"] = result.payloads
    out["kv_event_bytes"] = result.payload_bytes
    out["kv_event_payloads_lost"] = result.payloads_lost
    out["sink_errors"] = result.sink_errors
    out["engine_preemptions"] = sum(s.preemptions for s in result.engine_stats.values())
    return out


def _f(value: Any, spec: str, width: int) -> str:
    if value is None:
        return "-".rjust(width)
    return format(value, spec).rjust(width)


_COLUMNS = (
    ("TTFT mean", "ttft_mean_s", ".3f", 10),
    ("p90", "ttft_p90_s", ".3f", 9),
    ("p99", "ttft_p99_s", ".3f", 9),
    ("ITL ms", "itl_mean_s", ".1f", 7),
    ("out tok/s", "output_tokens_per_s", ".0f", 10),
    ("req/s", "requests_per_s", ".2f", 7),
    ("hit", "prefix_hit_rate", ".3f", 6),
    ("ideal", "ideal_hit_rate", ".3f", 6),
    ("wait q", "waiting_queue_mean", ".1f", 7),
    ("kv use", "kv_usage_mean", ".2f", 6),
)


def _row(label: str, entry: dict[str, Any], width: int) -> str:
    cells = [label.ljust(width)]
    for _h, key, spec, w in _COLUMNS:
        v = entry.get(key)
        if key == "itl_mean_s" and v is not None:
            v = v * 1000
        cells.append(_f(v, spec, w))
    cells.append(str(entry.get("completed", 0)).rjust(6))
    return " ".join(cells)


def _header(first: str, width: int) -> str:
    cells = [first.ljust(width)] + [h.rjust(w) for h, _k, _s, w in _COLUMNS] + ["done".rjust(6)]
    return " ".join(cells)


def format_run(summary: dict[str, Any]) -> str:
    """A per-stage table of one run, with the overall row and the per-pod request shares."""
    width = 12
    lines = [f"== {summary['config']} ==", _header("stage", width)]
    for s in summary["stages"]:
        lines.append(_row(s["name"], s, width))
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
    return "\n".join(lines)


def format_summary(summaries: Sequence[dict[str, Any]], baseline: str | None = None) -> str:
    """One row per config (overall figures) and ratios against `baseline` (default: random)."""
    if not summaries:
        return ""
    names = [s["config"] for s in summaries]
    base_name = baseline if baseline in names else ("random" if "random" in names else names[0])
    base = summaries[names.index(base_name)]
    width = max(12, *(len(n) for n in names))
    lines = [_header("config", width) + "  max pod/fair"]
    for s in summaries:
        share = s.get("max_pod_share_vs_fair")
        lines.append(_row(s["config"], s, width) + "  " + _f(share, ".2f", 12))
    lines.append("")
    lines.append(f"ratios vs {base_name}: throughput = tok/s / base; TTFT = base / config")
    for s in summaries:
        tp = _ratio(s.get("output_tokens_per_s"), base.get("output_tokens_per_s"))
        tm = _ratio(base.get("ttft_mean_s"), s.get("ttft_mean_s"))
        t9 = _ratio(base.get("ttft_p90_s"), s.get("ttft_p90_s"))
        hv = s.get("hit_rate_vs_ideal")
        lines.append(
            f"{s['config'].ljust(width)} throughput x{_f(tp, '.2f', 6)}  TTFT mean x{_f(tm, '.1f', 7)}"
            f"  TTFT p90 x{_f(t9, '.1f', 7)}  hit/ideal {_f(hv, '.3f', 6)}"
        )
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


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
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
