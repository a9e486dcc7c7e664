"""``kvaware bench`` (the routing benchmark on the emulated fleet) and ``kvaware sim serve``
(live emulated pods): their arguments and their runs. See `BENCH_HELP` and `SERVE_HELP`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.extras import missing_extras, missing_extras_message
from kvaware_scorer.resources import (
    BUILTIN_TOKENIZER_MODEL,
    builtin_tokenizer,
    default_trace,
    resolve_config,
    shipped_configs,
)
from kvaware_scorer.sim.bench import run_bench
from kvaware_scorer.sim.fleet import FleetConfig
from kvaware_scorer.sim.profiles import PROFILES, get_profile
from kvaware_scorer.sim.report import format_run, format_summary, plot_runs, write_json
from kvaware_scorer.sim.workloads import (
    QUICK_LADDER,
    UPSTREAM_LADDER,
    LoadStage,
    MultiTurnWorkload,
    SharedPrefixWorkload,
    TraceWorkload,
    Workload,
    parse_stages,
)

__all__ = [
    "BENCH_HELP",
    "SERVE_HELP",
    "bench_configs",
    "build_fleet",
    "build_workload_factory",
    "plot_title",
    "register",
    "run",
    "run_serve",
]

BENCH_HELP = """\
Run the same workload through each scheduler config on an emulated vLLM fleet (discrete-event,
deterministic per seed) and print a table per config plus a comparison against the baseline.

  kvaware bench --workload shared-prefix --quick
  kvaware bench --configs precise random --json out.json --plot out.png

Each --configs entry is a scheduler YAML path, the name of a shipped config (precise, random,
... : the files of config/, also inside the installed package), or builtin:random /
builtin:round-robin / builtin:oracle. Without --configs every shipped config runs.
See docs/emulator.md.
"""

SERVE_HELP = """\
Start N live emulated vLLM pods, each an OpenAI-compatible HTTP server with vLLM's /metrics and
a ZMQ KV-event publisher (vLLM's frames, topic and replay), in real time scaled by --speedup,
until SIGINT/SIGTERM. Without --tokenizer the pods serve the model kvaware/sim with the
tokenizer built into kvaware, which every kvaware gateway knows, so text and chat requests work
through a gateway with no tokenizer configuration: give `kvaware serve --endpoints` the file
written by --endpoints-out (the README's "Try it" section). See docs/live.md.
"""
MULTI_TURN_STAGES = (LoadStage(2, 60), LoadStage(4, 60), LoadStage(6, 60), LoadStage(8, 60))
MULTI_TURN_QUICK = (LoadStage(4, 30), LoadStage(8, 30))
TRACE_QUICK_REQUESTS = 600


def register(sub: Any) -> None:
    """Add the ``bench`` subcommand and the ``sim`` command group."""
    # NOTE: long on purpose: a flat list of argparse flags, one per setting.
    _register_sim(sub)
    p = sub.add_parser(
        "bench",
        help="benchmark routing configs on an emulated vLLM fleet",
        description=BENCH_HELP,
    )
    p.add_argument(
        "--workload",
        choices=["shared-prefix", "multi-turn", "trace"],
        default="shared-prefix",
        help="the request shape: shared system prompts, chat sessions, or a Mooncake trace",
    )
    p.add_argument(
        "--configs",
        nargs="+",
        metavar="CFG",
        help="scheduler YAMLs, shipped config names or builtin:<name> "
        "(default: every shipped config)",
    )
    p.add_argument("--quick", action="store_true", help="short version of the ladder (same shape)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write TTFT p90 / throughput vs QPS charts (PNG)")
    p.add_argument("--baseline", help="config name ratios are computed against (default: random)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload and the fleet")
    fleet = p.add_argument_group("fleet")
    fleet.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="qwen3-32b-2xh100",
        help="engine profile: model, GPUs, vLLM settings",
    )
    fleet.add_argument("--pods", type=int, default=8, help="emulated vLLM pods")
    fleet.add_argument("--block-size", type=int, help="vLLM block size (default: the profile's)")
    fleet.add_argument(
        "--max-model-len", type=int, help="vLLM --max-model-len (default: the profile's)"
    )
    fleet.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="vLLM --max-num-batched-tokens (default: the profile's)",
    )
    fleet.add_argument(
        "--max-num-seqs", type=int, help="vLLM --max-num-seqs (default: the profile's)"
    )
    fleet.add_argument(
        "--engine-hash",
        choices=["xxh3", "sha256"],
        default="xxh3",
        help="block hash of the emulated engines (sha256: vLLM's; xxh3: faster)",
    )
    fleet.add_argument(
        "--event-delay", type=float, default=0.005, help="KV-event delivery delay (s)"
    )
    fleet.add_argument(
        "--metrics-interval",
        type=float,
        default=0.05,
        help="metrics scrape period (s); 0 = every step",
    )
    fleet.add_argument(
        "--periodic-scrape",
        action="store_true",
        help="scrape every --metrics-interval whatever the router reads (default: as the "
        "live scheduler does, at that interval only while the router reads the metrics at "
        "least that often, else at its next read, and once a second without reads)",
    )
    fleet.add_argument(
        "--event-loss", type=float, default=0.0, help="probability a KV-event payload is lost"
    )
    fleet.add_argument(
        "--scheduler-replicas",
        type=int,
        default=1,
        help="scheduler replicas sharing the traffic in turn (active-active); each ingests "
        "every KV event, each keeps its own routing history and in-flight counts",
    )
    fleet.add_argument(
        "--drain-between-stages",
        action="store_true",
        help="start each stage only after every earlier request finished, so no stage inherits "
        "a backlog (default: off, like the upstream ladder)",
    )
    fleet.add_argument(
        "--drain-timeout",
        type=float,
        default=3600.0,
        help="virtual seconds allowed after the last stage",
    )
    load = p.add_argument_group("load")
    load.add_argument(
        "--stages",
        help="rate:duration,... in requests/s and seconds (default: the workload's ladder)",
    )
    load.add_argument(
        "--arrival",
        choices=["poisson", "constant"],
        default="poisson",
        help="inter-arrival times within a stage",
    )
    sp = p.add_argument_group("shared-prefix")
    sp.add_argument("--groups", type=int, default=150, help="system prompts (groups)")
    sp.add_argument("--prompts-per-group", type=int, default=5, help="questions per system prompt")
    sp.add_argument(
        "--system-prompt-len", type=int, default=6000, help="system prompt length (tokens)"
    )
    sp.add_argument("--question-len", type=int, default=1200, help="question length (tokens)")
    sp.add_argument("--output-len", type=int, default=1000, help="output length (tokens)")
    mt = p.add_argument_group("multi-turn")
    mt.add_argument("--turns", type=int, default=8, help="turns per chat session")
    mt.add_argument("--system-prompts", type=int, default=10, help="distinct system prompts")
    mt.add_argument(
        "--mt-system-prompt-len", type=int, default=2000, help="system prompt length (tokens)"
    )
    mt.add_argument(
        "--user-message-len", type=int, default=400, help="user message length (tokens)"
    )
    mt.add_argument("--answer-len", type=int, default=400, help="answer length (tokens)")
    mt.add_argument(
        "--think-time", type=float, default=5.0, help="seconds between a reply and the next turn"
    )
    tr = p.add_argument_group("trace")
    tr.add_argument("--trace", help="Mooncake JSONL (default: the trace bundled with kvaware)")
    tr.add_argument("--time-scale", type=float, default=1.0, help="scale inter-arrival times")
    tr.add_argument(
        "--max-requests",
        type=int,
        help=f"requests replayed (default: all; {TRACE_QUICK_REQUESTS} with --quick)",
    )
    tr.add_argument("--window", type=float, default=120.0, help="report window (s)")
    p.set_defaults(func=run)


def build_fleet(args: argparse.Namespace) -> FleetConfig:
    """The fleet described by the CLI arguments."""
    profile = get_profile(args.profile).with_overrides(
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
    )
    return FleetConfig(
        profile=profile,
        num_pods=args.pods,
        engine_hash=args.engine_hash,
        event_delay_s=args.event_delay,
        metrics_interval_s=args.metrics_interval,
        scrape_on_read=not args.periodic_scrape,
        drain_timeout_s=args.drain_timeout,
        event_loss=args.event_loss,
        seed=args.seed,
        drain_between_stages=args.drain_between_stages,
    )


def build_workload_factory(args: argparse.Namespace, vocab_size: int) -> Any:
    """A zero-argument factory of the workload described by the CLI arguments."""
    stages = parse_stages(args.stages) if args.stages else None
    if args.workload == "shared-prefix":
        load = stages or (QUICK_LADDER if args.quick else UPSTREAM_LADDER)

        def shared_prefix() -> Workload:
            return SharedPrefixWorkload(
                num_groups=args.groups,
                num_prompts_per_group=args.prompts_per_group,
                system_prompt_len=args.system_prompt_len,
                question_len=args.question_len,
                output_len=args.output_len,
                load=load,
                arrival=args.arrival,
                vocab_size=vocab_size,
                seed=args.seed,
            )

        return shared_prefix
    if args.workload == "multi-turn":
        mt_load = stages or (MULTI_TURN_QUICK if args.quick else MULTI_TURN_STAGES)

        def multi_turn() -> Workload:
            return MultiTurnWorkload(
                load=mt_load,
                num_system_prompts=args.system_prompts,
                system_prompt_len=args.mt_system_prompt_len,
                turns=args.turns,
                user_message_len=args.user_message_len,
                answer_len=args.answer_len,
                think_time_s=args.think_time,
                arrival=args.arrival,
                vocab_size=vocab_size,
                seed=args.seed,
            )

        return multi_turn
    path = Path(args.trace) if args.trace else default_trace()
    if not path.is_file():
        raise ConfigError("trace file not found (give --trace PATH)", str(path))
    max_requests = args.max_requests or (TRACE_QUICK_REQUESTS if args.quick else None)

    def trace() -> Workload:
        return TraceWorkload(
            path=path,
            time_scale=args.time_scale,
            max_requests=max_requests,
            window_s=args.window,
            vocab_size=vocab_size,
            seed=args.seed,
        )

    return trace


def plot_title(args: argparse.Namespace, fleet: FleetConfig) -> str:
    """The chart title: workload, ``--quick``, seed, stage draining and the fleet."""
    flags = " --quick" if args.quick else ""
    flags += " --drain-between-stages" if args.drain_between_stages else ""
    return (
        f"{args.workload}{flags}, seed {args.seed}: "
        f"{fleet.num_pods} x {fleet.profile.describe()['name']}"
    )


def bench_configs(names: list[str] | None) -> list[str]:
    """The configs to run: each named one resolved (`resolve_config`), or every shipped config.

    Raises:
        ConfigError: No names given and no config shipped.
    """
    if not names:
        shipped = shipped_configs()
        if not shipped:
            raise ConfigError("no shipped config found; give --configs", "--configs")
        return [str(p) for p in shipped.values()]
    return [n if n.startswith("builtin:") else str(resolve_config(n)) for n in names]


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; returns the exit code."""
    if args.plot and missing_extras(["plot"]):
        # Fail before a run that can take minutes, not after it.
        print(missing_extras_message("kvaware bench --plot", ["plot"]), file=sys.stderr)
        return 1
    try:
        fleet = build_fleet(args)
        factory = build_workload_factory(args, fleet.profile.model.vocab_size)
        summaries = run_bench(
            bench_configs(args.configs),
            factory,
            fleet,
            seed=args.seed,
            progress=not args.no_progress,
            replicas=args.scheduler_replicas,
        )
    except ConfigError as exc:
        print(f"kvaware bench: {exc}", file=sys.stderr)
        return 2
    profile = fleet.profile.describe()
    print(
        f"fleet: {fleet.num_pods} x {profile['name']} ({profile['model']}, TP={profile['tensor_parallel_size']}, "
        f"{profile['kv_capacity_tokens']:,} KV tokens/pod, block {profile['block_size']}); "
        f"workload {args.workload}{' (quick)' if args.quick else ''}, seed {args.seed}"
        + (", stages drained between" if args.drain_between_stages else "")
    )
    for s in summaries:
        print()
        print(format_run(s))
    print()
    print(format_summary(summaries, args.baseline))
    meta = {
        "workload": factory().describe(),
        "profile": profile,
        "fleet": {
            "num_pods": fleet.num_pods,
            "engine_hash": fleet.engine_hash,
            "event_delay_s": fleet.event_delay_s,
            "metrics_interval_s": fleet.metrics_interval_s,
            "scrape_on_read": fleet.scrape_on_read,
            "drain_timeout_s": fleet.drain_timeout_s,
            "event_loss": fleet.event_loss,
            "drain_between_stages": fleet.drain_between_stages,
        },
        "seed": args.seed,
        "quick": bool(args.quick),
        "scheduler_replicas": args.scheduler_replicas,
    }
    if args.json:
        write_json(args.json, summaries, meta)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot_runs(args.plot, summaries, plot_title(args, fleet))
        print(f"wrote {args.plot}")
    return 0


# -- kvaware sim serve ------------------------------------------------------------------------


def _register_sim(sub: Any) -> None:
    # NOTE: long on purpose: a flat list of argparse flags, one per setting.
    sim = sub.add_parser(
        "sim",
        help="live emulated vLLM pods (HTTP + ZMQ KV events)",
        description="Live emulated vLLM pods.",
    )
    simsub = sim.add_subparsers(dest="sim_command", metavar="COMMAND")
    p = simsub.add_parser(
        "serve",
        help="start N emulated vLLM pods until SIGINT/SIGTERM",
        description=SERVE_HELP,
    )
    p.add_argument("--pods", type=int, default=3, help="pods to start")
    p.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="llama-3.1-8b-1xh100",
        help="engine profile: model shape, GPU, vLLM settings",
    )
    p.add_argument(
        "--model",
        help=f"served model name (default: {BUILTIN_TOKENIZER_MODEL}; with --tokenizer or "
        "--build-tokenizer the profile's model)",
    )
    p.add_argument("--speedup", type=float, default=1.0, help="emulated seconds per wall second")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument(
        "--tokenizer",
        help="tokenizer directory (or tokenizer.json) of the model "
        "(default: the tokenizer built into kvaware)",
    )
    tok.add_argument(
        "--build-tokenizer",
        metavar="ROOT",
        help="build the offline test tokenizer under ROOT/<model> and use it (point a scorer's "
        "tokenizersPoolConfig.local.autoDiscoveryDir at ROOT)",
    )
    p.add_argument("--host", default="127.0.0.1", help="listen address")
    p.add_argument(
        "--port", type=int, default=0, help="HTTP port of pod 0, +i for pod i (0 = free)"
    )
    eng = p.add_argument_group("engine")
    eng.add_argument(
        "--num-gpu-blocks", type=int, help="KV blocks per pod (default: the profile's capacity)"
    )
    for flag in ("--block-size", "--max-num-batched-tokens", "--max-num-seqs", "--max-model-len"):
        eng.add_argument(flag, type=int, help=f"vLLM {flag} (default: the profile's)")
    eng.add_argument(
        "--engine-hash",
        choices=["sha256", "xxh3"],
        default="sha256",
        help="block hash in the KV events (sha256: vLLM's default; xxh3: faster)",
    )
    eng.add_argument("--hash-seed", default="", help="the pods' PYTHONHASHSEED (default: unset)")
    eng.add_argument(
        "--default-max-tokens", type=int, default=16, help="max_tokens when a request gives none"
    )
    ev = p.add_argument_group("KV events")
    ev.add_argument("--no-kv-events", action="store_true", help="publish no KV events")
    ev.add_argument(
        "--kv-events-connect",
        metavar="ENDPOINT",
        help="connect every pod's PUB to this (router-bound) endpoint instead of binding",
    )
    ev.add_argument(
        "--kv-port",
        type=int,
        default=0,
        help="publisher port of pod 0 (+2i for pod i, replay +2i+1; 0 = free ports)",
    )
    ev.add_argument(
        "--kv-topic",
        default="kv@{pod}@{model}",
        help='topic template ({pod}, {model}); "" = vLLM\'s default empty topic',
    )
    ev.add_argument("--no-replay", action="store_true", help="no replay ROUTER")
    ev.add_argument(
        "--buffer-steps", type=int, default=10_000, help="event batches kept for replay"
    )
    run_ = p.add_argument_group("run")
    run_.add_argument(
        "--endpoints-out", metavar="PATH", help="write an endpoints file for kvaware serve"
    )
    run_.add_argument(
        "--duration", type=float, default=0.0, help="stop after this many seconds (0 = never)"
    )
    run_.add_argument(
        "--stop-on-eof",
        action="store_true",
        help="stop when standard input closes (a parent process went away)",
    )
    p.set_defaults(func=run_serve, extras=("gateway", "tokenizers"))
    sim.set_defaults(func=lambda args: (sim.print_help(), 2)[1])


def run_serve(args: argparse.Namespace) -> int:
    """Run live pods until interrupted; returns the exit code."""
    from pydantic import ValidationError

    from kvaware_scorer.config import format_validation_error
    from kvaware_scorer.sim.live import LiveFleet, LivePodsConfig

    try:
        tokenizer = args.tokenizer
        model = args.model or get_profile(args.profile).model.name
        if not tokenizer and not args.build_tokenizer:
            # The built-in tokenizer, under the name every tokenizer registry resolves to it.
            tokenizer = str(builtin_tokenizer())
            model = args.model or BUILTIN_TOKENIZER_MODEL
        if args.build_tokenizer:
            from kvaware_scorer.tokenization import install_local_tokenizer

            tokenizer = str(install_local_tokenizer(args.build_tokenizer, model))
        config = LivePodsConfig(
            profile=args.profile,
            model=model,
            num_pods=args.pods,
            speedup=args.speedup,
            host=args.host,
            base_port=args.port,
            num_gpu_blocks=args.num_gpu_blocks,
            block_size=args.block_size,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
            engine_hash=args.engine_hash,
            hash_seed=args.hash_seed,
            tokenizer=tokenizer,
            kv_events=not args.no_kv_events,
            kv_events_connect=args.kv_events_connect,
            kv_events_base_port=args.kv_port,
            kv_topic=args.kv_topic,
            replay=not args.no_replay,
            buffer_steps=args.buffer_steps,
            default_max_tokens=args.default_max_tokens,
        )
        fleet = LiveFleet(config)
    except ValidationError as exc:
        print(f"kvaware sim serve: {format_validation_error(exc)}", file=sys.stderr)
        return 2
    except (ConfigError, ValueError) as exc:
        print(f"kvaware sim serve: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(fleet, args))
    except (OSError, ConfigError) as exc:
        print(f"kvaware sim serve: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(fleet: Any, args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    watcher: asyncio.Task[None] | None = None
    try:
        await fleet.start()
        for pod in fleet.pods:
            events = "off"
            if pod.kv_endpoint:
                events = f"{pod.kv_endpoint} (replay {pod.replay_endpoint or 'none'}, topic {pod.topic!r})"
            print(f"kvaware sim: {pod.name} {pod.url} id {pod.id} KV events {events}", flush=True)
        if args.endpoints_out:
            fleet.write_endpoints(args.endpoints_out)
        profile = fleet.profile
        print(
            f"kvaware sim: {len(fleet.pods)} pods ready ({profile.name}, model "
            f"{fleet.config.model_name}, {fleet.num_gpu_blocks:,} KV blocks of "
            f"{profile.block_size} tokens per pod, speedup {fleet.config.speedup:g}x)",
            flush=True,
        )
        if args.stop_on_eof:
            watcher = asyncio.create_task(_wait_for_eof(stop))
        if args.duration > 0:
            loop.call_later(args.duration, stop.set)
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        if watcher is not None:
            watcher.cancel()
        await fleet.stop()


async def _wait_for_eof(stop: asyncio.Event) -> None:
    """Set `stop` once standard input reaches end of file."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(65536):
        pass
    stop.set()
