"""The ``kvaware epp`` command: the Go EPP's flags, warnings for those it cannot honour, the
Envoy bootstrap it writes, and the drain on SIGTERM with a real Envoy in front."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from kvaware_scorer.cli import build_parser, main
from kvaware_scorer.epp import EnvoyProcess, bootstrap, envoy_binary, write_bootstrap
from kvaware_scorer.epp.cli import parse_bool
from kvaware_scorer.scheduler import Endpoint, load_endpoints
from tests.conftest import free_port
from tests.gateway.pods import FakePod

from .conftest import MODEL, ROOT, Command, endpoints_yaml, wait_for


def test_go_epp_flags_and_defaults() -> None:
    """Every Go EPP flag parses, with the Go EPP's defaults; --config is --config-file."""
    args = build_parser().parse_args(["epp", "--config", "c.yaml"])
    assert (args.grpc_port, args.grpc_health_port, args.metrics_port) == (9002, 9003, 9090)
    assert args.secure_serving is True and args.drain_timeout == "30s"
    assert args.config_file == Path("c.yaml") and args.pool_namespace == "default"
    args = build_parser().parse_args(
        [
            "epp", "--config-text", "x", "--secure-serving=false", "--cert-path", "/c",
            "--pool-name", "p", "--pool-namespace", "ns", "--endpoint-selector", "a=b",
            "--endpoint-target-ports", "8000,8001", "--drain-timeout", "5s",
            "--grpc-max-recv-msg-size", "1000000", "--disable-endpoint-subset-filter",
            "--emit-endpoint-scores", "-v", "4",
        ]
    )  # fmt: skip
    assert args.secure_serving is False and args.epp_verbosity == 4
    assert args.disable_endpoint_subset_filter and args.emit_endpoint_scores
    assert build_parser().parse_args(["epp", "--secure-serving"]).secure_serving is True
    assert parse_bool("True") and not parse_bool("0")


def test_unhonoured_flags_warn_and_missing_parts_are_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A Go EPP flag this EPP cannot honour is accepted with a warning naming it; no config or
    no endpoint source is a clear error (exit 2)."""
    rc = main(["epp", "--ha-enable-leader-election", "--metrics-endpoint-auth=true"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--ha-enable-leader-election is accepted but not honoured" in err
    assert "--metrics-endpoint-auth is accepted but not honoured" in err
    assert "--config-file" in err
    rc = main(
        ["epp", "--config", str(ROOT / "config" / "load.yaml"),
         "--pool-group", "inference.networking.k8s.io"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "no endpoints" in err and "pool-group" not in err


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"lb": "original_dst", "epp_tls": True},
        {
            "request_body_mode": "BUFFERED",
            "response_body_mode": "STREAMED",
            "failure_mode_allow": True,
        },
        {"subset_hint": ["127.0.0.1:8000"], "health_check": False, "access_log": True},
    ],
)
def test_bootstraps_pass_envoy_validation(tmp_path: Path, opts: dict[str, Any]) -> None:
    """Every bootstrap variant `bootstrap` writes is valid for the Envoy binary we ship with."""
    eps = [Endpoint("a", "127.0.0.1", 8000), Endpoint("b", "127.0.0.1", 8001)]
    cfg = write_bootstrap(
        tmp_path / "envoy.yaml",
        bootstrap(listen_port=10000, admin_port=19901, epp_port=9002, endpoints=eps, **opts),
    )
    proc = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(cfg), "--use-dynamic-base-id"],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout.decode()[-2000:] + proc.stderr.decode()[-2000:]


@pytest.mark.slow
async def test_sigterm_drains_in_flight_streams(tmp_path: Path, pods: list[FakePod]) -> None:
    """SIGTERM to ``kvaware epp`` lets a stream in progress finish complete, then the command
    exits 0; it writes the Envoy bootstrap it was asked for, and that bootstrap routes."""
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(endpoints_yaml(pods))
    grpc_port, envoy_port = free_port(), free_port()
    out = tmp_path / "envoy.yaml"
    epp = Command(
        [
            "epp", "--config", str(ROOT / "config" / "load.yaml"), "--endpoints", str(endpoints),
            "--grpc-port", str(grpc_port), "--grpc-health-port", str(free_port()),
            "--metrics-port", "-1", "--host", "127.0.0.1", "--secure-serving=false",
            "--drain-timeout", "10s", "--envoy-config-out", str(out),
            "--envoy-port", str(envoy_port),
        ],
        tmp_path / "epp.log",
    )  # fmt: skip
    envoy: EnvoyProcess | None = None
    try:
        await asyncio.to_thread(epp.wait_line, "serving ext_proc")
        data = yaml.safe_load(out.read_text())
        # NOTE: the written bootstrap uses admin port 19901; a test may not own it.
        admin = free_port()
        data["admin"]["address"]["socket_address"]["port_value"] = admin
        write_bootstrap(out, data)
        assert {e.id for e in load_endpoints(endpoints)} == {f"127.0.0.1:{p.port}" for p in pods}
        envoy = EnvoyProcess(out, admin, tmp_path / "envoy.log")
        envoy.start()
        await envoy.await_ready(30)
        url = f"http://127.0.0.1:{envoy_port}/v1/completions"
        body = {
            "model": MODEL,
            "prompt": "x",
            "stream": True,
            "test_pod": {"chunks": 12, "delay": 0.1},
        }
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            # NOTE: Envoy may answer before its first ext_proc connection is up (a loaded
            # machine); the drain is what is tested, so wait for the first routed request.
            for _ in range(50):
                async with s.post(url, json={**body, "stream": False}) as probe:
                    await probe.read()
                    if probe.status == 200:
                        break
                await asyncio.sleep(0.2)
            async with s.post(url, json=body) as resp:
                assert resp.status == 200
                first = await resp.content.readline()
                assert first.startswith(b"data: ")
                epp.signal(signal.SIGTERM)
                rest = await resp.read()
            text = (first + rest).decode()
            assert text.count("data: {") == 12 and text.rstrip().endswith("data: [DONE]")
            await wait_for(lambda: epp.proc.poll() is not None, 15, "the EPP to exit")
            assert epp.proc.returncode == 0
            async with s.post(url, json={"model": MODEL, "prompt": "x"}) as resp:
                assert resp.status == 500  # FULL_DUPLEX, failure_mode_allow false: EPP gone
    finally:
        if envoy is not None:
            envoy.stop()
        epp.stop()


def test_without_the_extra_one_line_names_it() -> None:
    """Without grpcio the command says in one line which extra to install (exit 1)."""
    code = (
        "import sys; sys.modules['grpc'] = None\n"
        "from kvaware_scorer.cli import main\n"
        "sys.exit(main(['epp', '--config', 'c.yaml']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'kvaware-scorer[epp]'" in lines[0]


async def test_cert_path_serves_that_certificate(tmp_path: Path) -> None:
    """With --cert-path the ext_proc port serves the given certificate: a client trusting only
    it gets through the TLS handshake (health check SERVING)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from kvaware_scorer.epp import EndpointPicker, EppConfig
    from kvaware_scorer.epp.tls import self_signed
    from kvaware_scorer.scheduler import Scheduler

    key, cert = self_signed("epp.test")
    (tmp_path / "tls.key").write_bytes(key)
    (tmp_path / "tls.crt").write_bytes(cert)
    scheduler = Scheduler.from_yaml(ROOT / "config" / "load.yaml")
    cfg = EppConfig(
        host="127.0.0.1",
        grpc_port=0,
        grpc_health_port=0,
        metrics_port=None,
        cert_path=str(tmp_path),
    )
    picker = EndpointPicker(scheduler, cfg, own_scheduler=True)
    await picker.start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert)
        opts = [("grpc.ssl_target_name_override", "epp.test")]
        async with grpc.aio.secure_channel(f"127.0.0.1:{picker.grpc_port}", creds, opts) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            req = health_pb2.HealthCheckRequest(
                service="envoy.service.ext_proc.v3.ExternalProcessor"
            )
            resp = await stub.Check(req, timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await picker.stop(0)
