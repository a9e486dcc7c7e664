"""Routing benchmark against random on the emulated vLLM fleet (the project's main-job benchmark).

Runs ``kvaware bench`` for one or more workloads with the same configs and prints, per workload,
the per-stage tables and the headline comparison against random. Also prints the emulator's
calibration figures next to upstream's published ones.

Usage::

    python benchmarks/bench_routing.py --quick                      # shared-prefix, quick ladder
    python benchmarks/bench_routing.py --workload all --out results  # full runs, JSON + PNG each
    python benchmarks/bench_routing.py --calibration                  # step-time model only

Configs default to ``config/{random,load,estimated,precise}.yaml`` (those that exist) plus the
``builtin:oracle`` reference; pass ``--configs`` to choose.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvaware_scorer.cli import main as kvaware_main
from kvaware_scorer.sim.profiles import PROFILES

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIGS = ["random", "load", "estimated", "precise"]
TRACE = ROOT / "benchmarks" / "traces" / "mooncake_synthetic_trace.jsonl"

# Upstream figures (llm-d kv-cache-manager benchmarking/73-capacity, 8 x Qwen3-32B on 2 x H100).
UPSTREAM_ITL_MEAN_S = {"precise": 0.026, "estimated": 0.024, "random": 0.025, "load": 0.024}


def default_configs() -> list[str]:
    """The project's config YAMLs that exist, then the oracle reference."""
    found = [str(ROOT / "config" / f"{c}.yaml") for c in DEFAULT_CONFIGS]
    present = [c for c in found if Path(c).is_file()]
    if not present:
        present = ["builtin:random", "builtin:round-robin"]
    return [*present, "builtin:oracle"]


def calibration() -> None:
    """Print the step-time model's decode and prefill figures per profile."""
    print("step-time calibration (roofline; see docs/emulator.md)")
    print(f"{'profile':<22} {'batch':>5} {'ctx':>6} {'decode step ms':>15}")
    for p in PROFILES.values():
        for batch, ctx in ((1, 1000), (16, 7700), (32, 7700), (64, 7700), (128, 7700)):
            print(
                f"{p.name:<22} {batch:>5} {ctx:>6} {1000 * p.decode_step_time(batch, ctx):>15.1f}"
            )
        print(
            f"{p.name:<22} prefill {p.prefill_throughput():,.0f} tokens/s (8192-token chunks), "
            f"KV capacity {p.kv_capacity_tokens:,} tokens ({p.num_gpu_blocks} blocks of {p.block_size})"
        )
    upstream = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in UPSTREAM_ITL_MEAN_S.items())
    print(f"upstream ITL mean (73-capacity, vLLM on 2 x H100): {upstream}; KV 307,328 tokens/pod")


def workload_args(workload: str) -> list[str]:
    """Extra CLI arguments per workload."""
    if workload == "trace":
        # Qwen3 supports 131,072 tokens with YaRN (model card); the trace has prompts up to 191k.
        return ["--trace", str(TRACE), "--max-model-len", "131072"]
    return []


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns an exit code."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--workload",
        choices=["shared-prefix", "multi-turn", "trace", "all"],
        default="shared-prefix",
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--configs", nargs="+")
    ap.add_argument("--out", type=Path, help="directory for <workload>.json and <workload>.png")
    ap.add_argument(
        "--calibration", action="store_true", help="print the step-time calibration only"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "extra", nargs=argparse.REMAINDER, help="more `kvaware bench` arguments after --"
    )
    args = ap.parse_args(argv)
    calibration()
    if args.calibration:
        return 0
    configs = args.configs or default_configs()
    workloads = (
        ["shared-prefix", "multi-turn", "trace"] if args.workload == "all" else [args.workload]
    )
    extra = [a for a in args.extra if a != "--"]
    rc = 0
    for wl in workloads:
        print(f"\n######## {wl}{' (quick)' if args.quick else ''} ########", flush=True)
        cmd = ["bench", "--workload", wl, "--configs", *configs, "--seed", str(args.seed)]
        cmd += workload_args(wl)
        if args.quick:
            cmd.append("--quick")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            cmd += ["--json", str(args.out / f"{wl}.json"), "--plot", str(args.out / f"{wl}.png")]
        rc = max(rc, kvaware_main(cmd + extra))
    return rc


if __name__ == "__main__":
    sys.exit(main())
