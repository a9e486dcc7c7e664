"""``kvaware epp``: the Endpoint Picker with the Go EPP's flags and defaults, until SIGTERM/SIGINT,
then a drain of up to ``--drain-timeout``.

The pool comes from, in order: ``--endpoints FILE`` (kvaware's endpoints file, watched); a
``file-discovery`` plugin in the EndpointPickerConfig; Kubernetes (``--pool-name`` /
``--pool-namespace``: the InferencePool's selector and target ports, or ``--endpoint-selector``
and ``--endpoint-target-ports`` without an InferencePool). Go EPP flags this EPP cannot honour
are accepted and named in a warning. Prints ``kvaware epp serving ext_proc on HOST:PORT`` once
it accepts streams (``--grpc-port 0`` picks a free port; the line tells which).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from kvaware_scorer.errors import ConfigError

__all__ = ["parse_bool", "register", "run"]

logger = logging.getLogger(__name__)

#: Go EPP flags accepted for drop-in compatibility but not honoured, and why.
_UNHONOURED = {
    "ha_enable_leader_election": "leader election is not implemented: run one replica "
    "(or several active-active replicas sharing a Redis index)",
    "metrics_endpoint_auth": "/metrics is served without Kubernetes authentication",
    "health_checking": "gRPC health is always served",
    "enable_pprof": "no pprof endpoint",
    "pool_group": "only the inference.networking.k8s.io InferencePool is watched",
    "model_server_metrics_scheme": "metrics are scraped over http",
    "model_server_metrics_https_insecure_skip_verify": "metrics are scraped over http",
    "total_queued_requests_metric": "vLLM metric names are built in",
    "total_running_requests_metric": "vLLM metric names are built in",
    "kv_cache_usage_percentage_metric": "vLLM metric names are built in",
    "lora_info_metric": "vLLM metric names are built in",
    "cache_info_metric": "vLLM metric names are built in",
    "tracing": "no OpenTelemetry tracing",
    "zap_encoder": "logs use Python logging",
    "zap_log_level": "use -v",
}


def parse_bool(value: str) -> bool:
    """A Go-style boolean flag value (``true``/``false``/``1``/``0``)."""
    v = value.strip().lower()
    if v in ("true", "t", "1", "yes"):
        return True
    if v in ("false", "f", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {value!r}")


def _go_bool(p: Any, flag: str, default: bool, help: str) -> None:
    p.add_argument(
        flag,
        nargs="?",
        const=True,
        default=default,
        type=parse_bool,
        metavar="BOOL",
        help=f"{help} (default {str(default).lower()}; {flag}=false to turn off)",
    )


def register(sub: Any) -> None:
    """Add the ``epp`` subcommand."""
    # NOTE: long on purpose: the Go EPP's flags and kvaware's, a flat list of argparse flags.
    p = sub.add_parser(
        "epp",
        help="run the Envoy ext_proc Endpoint Picker (drop-in for the Go EPP)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("serving (Go EPP flags)")
    g.add_argument("--grpc-port", type=int, default=9002, help="ext_proc port (default 9002)")
    g.add_argument(
        "--grpc-health-port", type=int, default=9003, help="gRPC health port (default 9003)"
    )
    g.add_argument(
        "--metrics-port",
        type=int,
        default=9090,
        help="Prometheus /metrics port (default 9090; 0 = a free port, -1 = none)",
    )
    _go_bool(
        g, "--secure-serving", True, "serve ext_proc over TLS (self-signed unless --cert-path)"
    )
    g.add_argument(
        "--cert-path", default=None, help="directory with tls.crt and tls.key (default: none)"
    )
    g.add_argument(
        "--drain-timeout", default="30s", help="time streams get to end after SIGTERM (30s)"
    )
    g.add_argument(
        "--grpc-max-recv-msg-size",
        type=int,
        default=4 * 1024 * 1024,
        help="largest gRPC message in bytes (default 4194304)",
    )
    g.add_argument(
        "--host", default="0.0.0.0", help="listen address of every server (default 0.0.0.0)"
    )
    c = p.add_argument_group("configuration")
    cfg = c.add_mutually_exclusive_group()
    cfg.add_argument(
        "--config-file", "--config", dest="config_file", type=Path, default=None,
        help="EndpointPickerConfig YAML (this or --config-text is required; --config is "
        "kvaware's name for it)",
    )  # fmt: skip
    cfg.add_argument(
        "--config-text", default=None, help="EndpointPickerConfig YAML text (default: none)"
    )
    c.add_argument(
        "--endpoints",
        type=Path,
        default=None,
        help="kvaware endpoints file (watched; default none)",
    )
    d = p.add_argument_group("discovery (Go EPP flags)")
    d.add_argument("--pool-name", default="", help="InferencePool to watch (default: none)")
    d.add_argument(
        "--pool-namespace", default="default", help="namespace of the pool (default 'default')"
    )
    d.add_argument(
        "--endpoint-selector",
        default="",
        help="pod label selector, without an InferencePool (e.g. app=vllm; default none)",
    )
    d.add_argument(
        "--endpoint-target-ports",
        default="",
        help="comma-separated serving ports with --endpoint-selector (default none)",
    )
    d.add_argument(
        "--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, then ~/.kube)"
    )
    k = p.add_argument_group("picking (Go EPP flags)")
    k.add_argument(
        "--disable-endpoint-subset-filter",
        action="store_true",
        help="ignore the envoy.lb.subset_hint endpoint subset (default: honoured)",
    )
    k.add_argument(
        "--emit-endpoint-scores",
        action="store_true",
        help="add envoy.lb/x-gateway-destination-endpoint-scores (default off)",
    )
    k.add_argument(
        "--refresh-metrics-interval",
        default=None,
        help="seconds between pod metrics scrapes (default: the scraper's)",
    )
    k.add_argument(
        "-v", "--v", dest="epp_verbosity", type=int, default=0,
        help="log verbosity as the Go EPP's -v (1-3 info, 4+ debug; default 0)",
    )  # fmt: skip
    x = p.add_argument_group("kvaware")
    x.add_argument(
        "--endpoint-header",
        action="store_true",
        help="add x-kvaware-endpoint (the serving pod) to responses (default off)",
    )
    x.add_argument(
        "--test-hooks",
        action="store_true",
        help="honour the GIE conformance test headers (default off)",
    )
    x.add_argument("--no-scrape", action="store_true", help="do not scrape pod /metrics")
    x.add_argument("--seed", default=None, help="seed of the pickers' random choices")
    x.add_argument(
        "--envoy-config-out",
        type=Path,
        default=None,
        help="write a matching Envoy bootstrap here at start (default: none)",
    )
    x.add_argument(
        "--envoy-port", type=int, default=10000, help="listen port in that bootstrap (10000)"
    )
    x.add_argument(
        "--envoy-admin-port", type=int, default=19901, help="admin port in that bootstrap (19901)"
    )
    u = p.add_argument_group("accepted for compatibility, not honoured (a warning says so)")
    for name in _UNHONOURED:
        # NOTE: nargs="?" accepts Go's bare boolean form (``--ha-enable-leader-election``).
        u.add_argument(
            "--" + name.replace("_", "-"), nargs="?", const="true", default=None,
            help=argparse.SUPPRESS,
        )  # fmt: skip
    p.set_defaults(func=run, extras=("epp",))


def _warn_unhonoured(args: argparse.Namespace) -> None:
    for name, why in _UNHONOURED.items():
        value = getattr(args, name, None)
        if name == "pool_group" and value == "inference.networking.k8s.io":
            continue  # the group this EPP watches: honoured
        if value is not None:
            msg = f"--{name.replace('_', '-')} is accepted but not honoured: {why}"
            print(f"kvaware epp: warning: {msg}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; returns 0, 1 on a start failure, 2 on a configuration error."""
    try:
        from kvaware_scorer.epp.server import EndpointPicker
    except ModuleNotFoundError as exc:
        print(f"kvaware epp needs {exc.name}: pip install 'kvaware-scorer[epp]'", file=sys.stderr)
        return 1
    if args.epp_verbosity >= 4:
        logging.getLogger().setLevel(logging.DEBUG)
    elif args.epp_verbosity >= 1:
        logging.getLogger().setLevel(logging.INFO)
    _warn_unhonoured(args)
    try:
        picker, discovery = _build(args, EndpointPicker)
    except ConfigError as exc:
        print(f"kvaware epp: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(picker, discovery, args))
    except (OSError, ConfigError) as exc:
        print(f"kvaware epp: {exc}", file=sys.stderr)
        return 1
    return 0


def _build(args: argparse.Namespace, picker_cls: Any) -> tuple[Any, Any]:
    from kvaware_scorer.scheduler import Scheduler

    if args.config_file is None and args.config_text is None:
        raise ConfigError("give the EndpointPickerConfig: --config-file PATH or --config-text YAML")
    config = _epp_config(args)
    source: Any = args.config_file if args.config_file is not None else args.config_text
    scheduler = Scheduler.from_config(source, seed=args.seed)
    try:
        discovery, synced = _attach_endpoints(scheduler, args)
        picker = picker_cls(
            scheduler,
            config,
            own_scheduler=True,
            pool_name=args.pool_name or "kvaware",
            synced=synced,
        )
    except BaseException:
        scheduler.close()
        raise
    return picker, discovery


def _epp_config(args: argparse.Namespace) -> Any:
    from kvaware_scorer.epp.config import EppConfig

    return EppConfig(
        host=args.host,
        grpc_port=args.grpc_port,
        grpc_health_port=args.grpc_health_port,
        metrics_port=args.metrics_port if args.metrics_port >= 0 else None,
        secure_serving=args.secure_serving,
        cert_path=args.cert_path,
        drain_timeout=args.drain_timeout,
        grpc_max_recv_msg_size=args.grpc_max_recv_msg_size,
        subset_filter=not args.disable_endpoint_subset_filter,
        emit_endpoint_scores=args.emit_endpoint_scores,
        endpoint_header=args.endpoint_header,
        test_hooks=args.test_hooks,
    )


def _attach_endpoints(scheduler: Any, args: argparse.Namespace) -> tuple[Any, bool]:
    """Give the scheduler its endpoints: an endpoints file, a file-discovery plugin, or a
    Kubernetes pool. Returns the Kubernetes discovery (or None) and whether the pool is synced."""
    from kvaware_scorer.configio import flag_interval

    scrape_interval = flag_interval(args.refresh_metrics_interval, "--refresh-metrics-interval")
    file_discovery = any(pc.type == "file-discovery" for pc in scheduler.config.plugins.values())
    if args.endpoints is not None:
        scheduler.use_endpoints_file(
            args.endpoints, scrape=not args.no_scrape, scrape_interval=scrape_interval
        )
        return None, True
    if file_discovery:
        return None, True  # the plugin attached its file when the scheduler was built
    if args.pool_name or args.endpoint_selector:
        return _kubernetes_discovery(scheduler, args), False
    raise ConfigError(
        "no endpoints: give --endpoints FILE, a file-discovery plugin in the config, "
        "or --pool-name (Kubernetes)"
    )


def _kubernetes_discovery(scheduler: Any, args: argparse.Namespace) -> Any:
    from kvaware_scorer.epp.discovery import KubernetesDiscovery, PoolSpec

    spec = PoolSpec.from_flags(
        pool_name=args.pool_name,
        namespace=args.pool_namespace,
        selector=args.endpoint_selector,
        target_ports=args.endpoint_target_ports,
    )
    return KubernetesDiscovery.from_kubeconfig(
        scheduler, spec, kubeconfig=args.kubeconfig, scrape=not args.no_scrape
    )


async def _serve(picker: Any, discovery: Any, args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await picker.start()
        if discovery is not None:
            picker.cleanups.append(discovery.stop)
            discovery.on_synced = picker.mark_synced
            discovery.start()
    except BaseException:
        await picker.stop(0)
        for sig in signals:
            loop.remove_signal_handler(sig)
        raise
    if args.envoy_config_out is not None:
        from kvaware_scorer.epp.envoy import bootstrap, write_bootstrap

        file_pool = discovery is None
        write_bootstrap(
            args.envoy_config_out,
            bootstrap(
                listen_port=args.envoy_port,
                admin_port=args.envoy_admin_port,
                epp_port=picker.grpc_port,
                endpoints=picker.scheduler.endpoints,
                epp_tls=picker.config.secure_serving,
                lb="override_host" if file_pool else "original_dst",
            ),
        )
        print(f"kvaware epp wrote the Envoy bootstrap {args.envoy_config_out}", flush=True)
    host = picker.config.host
    print(
        f"kvaware epp serving ext_proc on {host}:{picker.grpc_port} "
        f"({'TLS' if picker.config.secure_serving else 'plaintext'}), health on "
        f"{picker.health_port}, metrics on {picker.metrics_port}",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        logger.info("shutting down")
        await picker.stop()
