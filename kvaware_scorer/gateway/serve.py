"""``kvaware serve --config C --endpoints E``: run the gateway until SIGINT or SIGTERM, then drain.

Prints one line ``kvaware gateway listening on http://HOST:PORT`` on standard output once it
accepts requests (``--port 0`` picks a free port; the line tells which).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from kvaware_scorer.configio import flag_interval
from kvaware_scorer.errors import ConfigError
from kvaware_scorer.extras import missing_extras_message
from kvaware_scorer.resources import resolve_config

__all__ = ["register", "run"]

logger = logging.getLogger(__name__)


def register(sub: Any) -> None:
    """Add the ``serve`` subcommand."""
    # NOTE: long on purpose: a flat list of argparse flags, one per setting.
    # Long by nature: one flat declaration per command-line flag, read as a table.
    p = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible routing gateway in front of the endpoints",
        description="Schedule every OpenAI request with the configured profile and proxy it "
        "to the chosen pod. Stops on SIGINT/SIGTERM after draining in-flight requests.",
    )
    p.add_argument(
        "--config",
        required=True,
        type=Path,
        help="EndpointPickerConfig YAML (scheduler), or a shipped config's name (precise, ...)",
    )
    p.add_argument(
        "--endpoints", required=True, type=Path, help="endpoints YAML (watched for changes)"
    )
    p.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="listen port (default 8080; 0 = free)")
    p.add_argument(
        "--gateway-config",
        type=Path,
        default=None,
        help="GatewayConfig YAML: limits, timeouts (default: none; flags override it)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=None,
        help="largest request body in bytes (default: 32 MiB)",
    )
    p.add_argument(
        "--max-attempts", type=int, default=None, help="pods tried per request (default: 3)"
    )
    p.add_argument(
        "--connect-timeout",
        default=None,
        help="seconds to connect to a pod, or e.g. 500ms (default: 2)",
    )
    p.add_argument(
        "--drain-timeout",
        default=None,
        help="seconds to drain at shutdown, or e.g. 30s (default: 30)",
    )
    p.add_argument(
        "--endpoint-header",
        action="store_true",
        default=None,
        help="add x-kvaware-endpoint to responses (reveals pod addresses)",
    )
    p.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        default=None,
        help="render a request's own chat_template (as vLLM's flag of the same name; default: "
        "such requests get 400)",
    )
    p.add_argument(
        "--max-client-connections",
        type=int,
        default=None,
        help="open client connections at most; more are refused with 503 (default 4096)",
    )
    p.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        help="file of API keys, one per line, for the inference routes (default: none, open)",
    )
    p.add_argument(
        "--api-key-env",
        default=None,
        help="environment variable holding API keys, comma-separated (default: none)",
    )
    p.add_argument(
        "--admin-key-file",
        type=Path,
        default=None,
        help="file of admin keys for /v1/score and /metrics (default: none, loopback only)",
    )
    p.add_argument(
        "--admin-key-env",
        default=None,
        help="environment variable holding admin keys (default: none)",
    )
    p.add_argument(
        "--no-scrape", action="store_true", help="do not scrape the pods' /metrics for load"
    )
    p.add_argument(
        "--refresh-metrics-interval",
        default=None,
        help="time between pod-metrics scrapes, e.g. 250ms (default: the shortest interval a "
        "configured plugin reads them at; nothing is scraped when no plugin reads them)",
    )
    p.add_argument(
        "--event-loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop: uvloop (the 'fast' extra; about a fifth less CPU per streamed "
        "request), asyncio, or auto = uvloop when installed (default: auto)",
    )
    p.add_argument(
        "--seed", default=None, help="seed of the pickers' random choices (default: random)"
    )
    p.set_defaults(func=run, extras=("gateway",))


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; returns 0, or 1 on a configuration error."""
    try:
        from kvaware_scorer.gateway.app import Gateway
    except ModuleNotFoundError as exc:
        print(
            f"kvaware serve needs {exc.name}: pip install 'kvaware-scorer[gateway]'",
            file=sys.stderr,
        )
        return 1
    from kvaware_scorer.gateway.config import load_gateway_config

    try:
        config = load_gateway_config(
            args.gateway_config,
            host=args.host,
            port=args.port,
            max_body_bytes=args.max_body_bytes,
            max_attempts=args.max_attempts,
            connect_timeout=args.connect_timeout,
            drain_timeout=args.drain_timeout,
            endpoint_header=args.endpoint_header,
            trust_request_chat_template=args.trust_request_chat_template,
            max_client_connections=args.max_client_connections,
            api_key_file=args.api_key_file,
            api_key_env=args.api_key_env,
            admin_key_file=args.admin_key_file,
            admin_key_env=args.admin_key_env,
        )
        run_loop = _loop_runner(args.event_loop)
        gateway = Gateway.from_files(
            resolve_config(args.config),
            args.endpoints,
            config,
            scrape=not args.no_scrape,
            scrape_interval=flag_interval(
                args.refresh_metrics_interval, "--refresh-metrics-interval"
            ),
            seed=args.seed,
        )
    except ConfigError as exc:
        print(f"kvaware serve: {exc}", file=sys.stderr)
        return 1
    try:
        run_loop(_serve(gateway))
    except OSError as exc:
        print(f"kvaware serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _loop_runner(choice: str) -> Callable[[Coroutine[Any, Any, None]], None]:
    """What runs the gateway's event loop: uvloop's or asyncio's (``auto``: uvloop when it is
    installed).

    Raises:
        ConfigError: ``uvloop`` was asked for and is not installed.
    """
    if choice != "asyncio":
        try:
            import uvloop
        except ModuleNotFoundError:
            if choice == "uvloop":
                raise ConfigError(
                    missing_extras_message("--event-loop uvloop", ["fast"]), "--event-loop"
                ) from None
        else:
            return uvloop.run
    return asyncio.run


async def _serve(gateway: Any) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await gateway.start()
    except BaseException:
        for sig in signals:
            loop.remove_signal_handler(sig)
        raise
    print(f"kvaware gateway listening on {gateway.url}", flush=True)
    try:
        await stop.wait()
    finally:
        # NOTE: a second signal during the drain interrupts it (default handlers again).
        for sig in signals:
            loop.remove_signal_handler(sig)
        logger.info("shutting down")
        await gateway.stop()
