"""``kvaware demo``: precise KV-aware routing vs random, through the real gateway, on live pods.

    kvaware demo            # about a minute
    kvaware demo --quick    # about 30 seconds
    kvaware demo --via envoy   # the same through Envoy with the epp Endpoint Picker

For each config (the shipped ``precise``, then ``random``) the demo starts fresh
live emulated pods (``kvaware sim serve`` in a child process: OpenAI HTTP servers publishing KV
events over ZMQ), a gateway in front of them with that config (the precise scorer ingests the
pods' KV events in connect mode and tokenizes with a locally built tokenizer, the very one the
pods use), and drives the same shared-prefix load through the gateway with several concurrent
streaming clients (text prompts and chat messages, one system prompt per group). It then prints
the table of ``kvaware bench`` for both runs: TTFT as the clients measured it (wall clock),
throughput, the prefix-hit rate the pods reported (``usage.prompt_tokens_details.
cached_tokens``) next to the ideal one, queue and KV usage sampled from the pods' ``/metrics``,
and each pod's share of the requests (from the gateway's ``x-kvaware-endpoint`` header).

The pods get a small KV capacity (``--num-gpu-blocks``): about 1.4 times the system prompts one
pod needs when every group sticks to one pod. Random routing sends every group everywhere, so
each pod's working set is about ``pods`` times its capacity and its prefix cache thrashes;
precise routing keeps each group on the pod that holds it.

Everything listens on 127.0.0.1 and stops by itself: at the end, on an error, on Ctrl-C, or
after ``--timeout`` seconds; the child process also exits when this process goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.sim.fleet import RunResult
from kvaware_scorer.sim.profiles import PROFILES, get_profile
from kvaware_scorer.sim.report import format_run, format_summary, summarize, write_json
from kvaware_scorer.tours.demo_load import (
    DEMO_MODEL,
    DemoRequest,
    DemoSettings,
    build_workload,
    default_num_gpu_blocks,
    ideal_hits,
    is_chat,
    scheduler_config,
    tokenize_all,
)
from kvaware_scorer.tours.demo_run import PodProcess, run_config, run_result

__all__ = [
    "DemoRequest",
    "DemoSettings",
    "PodProcess",
    "build_workload",
    "default_num_gpu_blocks",
    "register",
    "run",
    "run_demo",
    "scheduler_config",
]


async def run_demo(
    settings: DemoSettings, say: Callable[[str], object] = print
) -> list[dict[str, Any]]:
    """Run every config of `settings` on fresh pods; returns their summaries.

    Args:
        settings: What to run.
        say: Where progress lines go (``print`` by default).

    Raises:
        ConfigError: A config file is missing or invalid.
        TimeoutError: The demo ran longer than ``settings.timeout``.
    """
    from kvaware_scorer.tokenization import install_local_tokenizer

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvaware-demo-") as tmp:
        workdir = Path(tmp)
        root = workdir / "tokenizers"
        tokenizer = await asyncio.to_thread(install_local_tokenizer, root, DEMO_MODEL)
        configs = [(Path(c).stem, scheduler_config(c, root)) for c in settings.configs]
        requests = build_workload(settings)
        token_lists = await asyncio.to_thread(tokenize_all, requests, tokenizer)
        block_size = get_profile(settings.profile).block_size
        ideal = ideal_hits(token_lists, block_size)
        _announce(settings, token_lists, block_size, say)
        runs: list[RunResult] = []
        async with asyncio.timeout(settings.timeout):
            for name, config in configs:
                data = await run_config(name, config, settings, requests, tokenizer, workdir, say)
                failed = [o for o in data.outcomes if o.status != 200 or o.error]
                if failed:
                    say(f"  {name}: {len(failed)} request(s) failed, e.g. {failed[0].error}")
                say(f"  {name}: {len(requests)} requests in {data.duration:.1f} s")
                runs.append(run_result(data, requests, ideal, settings))
    summaries = [summarize(r) for r in runs]
    _report(summaries, settings, say)
    say(f"demo wall time {time.perf_counter() - t_start:.1f} s")
    if settings.json_path:
        write_json(settings.json_path, summaries, {"demo": _describe(settings)})
        say(f"wrote {settings.json_path}")
    return summaries


def _announce(
    settings: DemoSettings,
    token_lists: Sequence[Sequence[int]],
    block_size: int,
    say: Callable[[str], object],
) -> None:
    """The two lines saying what runs: the pods and their KV cache, then the load."""
    prompt_lens = sorted(len(t) for t in token_lists)
    blocks = settings.num_gpu_blocks or default_num_gpu_blocks(settings)
    say(
        f"kvaware demo: {settings.pods} live pods x {settings.profile} (model {DEMO_MODEL}, "
        f"{blocks:,} KV blocks x {block_size} tokens = {blocks * block_size:,} tokens/pod), "
        f"speedup {settings.speedup:g}x"
    )
    say(
        f"load: {settings.groups} shared system prompts x {settings.prompts_per_group} "
        f"questions ({sum(is_chat(g, settings.chat_share) for g in range(settings.groups))} "
        f"groups as chat), prompts "
        f"{prompt_lens[0]:,}-{prompt_lens[-1]:,} tokens, {settings.output_tokens} output "
        f"tokens, {settings.concurrency} concurrent streaming clients, "
        f"{settings.requests} requests per config, through "
        + ("Envoy + kvaware epp" if settings.via == "envoy" else "the gateway")
    )


def _report(
    summaries: list[dict[str, Any]], settings: DemoSettings, say: Callable[[str], object]
) -> None:
    """Each run's table, then the side-by-side summary against the last config."""
    say("")
    say("TTFT and throughput are wall-clock figures measured by the clients "
        f"(emulated GPU time = wall x {settings.speedup:g}); hit = cached_tokens / prompt_tokens "
        "reported by the pods; ideal = an infinite cache that saw every earlier prompt.")  # fmt: skip
    for s in summaries:
        say("")
        say(format_run(s))
    say("")
    say(format_summary(summaries, summaries[-1]["config"] if summaries else None))
    say("")


def _describe(settings: DemoSettings) -> dict[str, Any]:
    out = dict(vars(settings))
    out["configs"] = list(settings.configs)
    out["num_gpu_blocks"] = settings.num_gpu_blocks or default_num_gpu_blocks(settings)
    return out


def register(sub: Any) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser(
        "demo",
        help="precise vs random routing through the gateway on live emulated pods",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick", action="store_true", help="a shorter run (about 30 s: fewer requests)"
    )
    p.add_argument(
        "--configs",
        nargs="+",
        metavar="CFG",
        help="scheduler YAML paths or shipped config names (default: precise random)",
    )
    p.add_argument("--pods", type=int, help="live pods per run (default: 4)")
    p.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        help="engine profile of the pods (default: llama-3.1-8b-1xh100)",
    )
    p.add_argument("--speedup", type=float, help="emulated seconds per wall second (default: 1)")
    p.add_argument("--concurrency", type=int, help="concurrent clients (default: 16)")
    p.add_argument("--requests", type=int, help="requests per config (default: 1200; --quick 500)")
    p.add_argument("--groups", type=int, help="shared system prompts (default: 12)")
    p.add_argument("--prompts-per-group", type=int, help="questions per group (default: 6)")
    p.add_argument("--system-words", type=int, help="words per system prompt (default: 2000)")
    p.add_argument("--question-words", type=int, help="words per question (default: 60)")
    p.add_argument("--output-tokens", type=int, help="max_tokens per request (default: 24)")
    p.add_argument(
        "--chat-share", type=float, help="fraction of groups sent as chat (default: 0.5)"
    )
    p.add_argument(
        "--num-gpu-blocks", type=int, help="KV blocks per pod (default: sized to the load)"
    )
    p.add_argument("--seed", type=int, help="workload and picker seed (default: 0)")
    p.add_argument(
        "--timeout",
        type=float,
        help="stop everything after this many seconds (default: 170; --quick 90)",
    )
    p.add_argument("--json", metavar="PATH", help="write the summaries as JSON")
    p.add_argument(
        "--via",
        choices=["gateway", "envoy"],
        help="front door: kvaware's gateway (default) or Envoy with the epp Endpoint Picker (ext_proc)",
    )
    p.set_defaults(func=run, extras=("gateway", "tokenizers"))


def _settings(args: argparse.Namespace) -> DemoSettings:
    fields = (
        "pods", "profile", "speedup", "concurrency", "requests", "groups", "prompts_per_group",
        "system_words", "question_words", "output_tokens", "chat_share", "num_gpu_blocks",
        "seed", "timeout", "via",
    )  # fmt: skip
    changes: dict[str, Any] = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    if args.configs:
        changes["configs"] = tuple(args.configs)
    if args.json:
        changes["json_path"] = args.json
    return DemoSettings.quick_settings(**changes) if args.quick else DemoSettings(**changes)


def _check(settings: DemoSettings) -> None:
    positive = ("pods", "concurrency", "requests", "groups", "prompts_per_group", "output_tokens")
    for name in positive:
        if getattr(settings, name) < 1:
            raise ConfigError("must be >= 1", name.replace("_", "-"))
    if settings.speedup <= 0 or settings.timeout <= 0:
        raise ConfigError("speedup and timeout must be > 0")
    if not 0.0 <= settings.chat_share <= 1.0:
        raise ConfigError("must be in [0, 1]", "chat-share")
    if settings.system_words < 1 or settings.question_words < 1:
        raise ConfigError("prompts need words", "system-words")


async def _main(settings: DemoSettings) -> None:
    """`run_demo`, with SIGTERM cancelling it like Ctrl-C (the pods are stopped either way)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await run_demo(settings)
    finally:
        with contextlib.suppress(NotImplementedError):
            loop.remove_signal_handler(signal.SIGTERM)


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code."""
    try:
        settings = _settings(args)
        _check(settings)
    except ConfigError as exc:
        print(f"kvaware demo: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_main(settings))
    except ConfigError as exc:
        print(f"kvaware demo: {exc}", file=sys.stderr)
        return 2
    except TimeoutError:
        print(f"kvaware demo: stopped after {settings.timeout:g} s", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as exc:
        print(f"kvaware demo: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        print("kvaware demo: stopped", file=sys.stderr)
        return 143
    return 0
