"""Kubernetes discovery against a small local API server speaking the list/watch protocol of
InferencePools and Pods (no Kubernetes API server can run here), through the official client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from kvaware_scorer.epp.discovery import KubernetesDiscovery, PoolSpec, parse_selector
from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler import Scheduler

from .conftest import ROOT, wait_for

NS = "llm"
POOLS = "/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools"


def _pod(
    name: str, ip: str, *, ready: bool = True, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels or {"app": "vllm"}},
        "status": {
            "podIP": ip,
            "hostIP": "192.168.7.7",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


class FakeKube:
    """Pods and InferencePools in memory; list and watch (chunked JSON lines) over HTTP."""

    def __init__(self) -> None:
        self.rv = 1
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[tuple[int, str, str, dict[str, Any]]] = []  # rv, kind, type, object
        self.changed = asyncio.Condition()
        self.watches = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._pods)
        app.router.add_get(POOLS, self._pools)
        app.router.add_get(POOLS + "/{name}", self._pool)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def put(self, kind: str, obj: dict[str, Any], etype: str | None = None) -> None:
        self.rv += 1
        obj = json.loads(json.dumps(obj))
        obj["metadata"]["resourceVersion"] = str(self.rv)
        key = (kind, obj["metadata"]["name"])
        if etype is None:
            etype = "MODIFIED" if key in self.objects else "ADDED"
        if etype == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        self.events.append((self.rv, kind, etype, obj))
        async with self.changed:
            self.changed.notify_all()

    @staticmethod
    def _match(obj: dict[str, Any], query: Any) -> bool:
        sel = query.get("labelSelector")
        if sel:
            labels = obj["metadata"].get("labels") or {}
            if any(labels.get(k) != v for k, v in parse_selector(sel).items()):
                return False
        field = query.get("fieldSelector")
        return not (
            field
            and field.startswith("metadata.name=")
            and obj["metadata"]["name"] != field.split("=", 1)[1]
        )

    async def _list_or_watch(self, request: web.Request, kind: str) -> web.StreamResponse:
        q = request.query
        if q.get("watch") not in ("true", "1", "True"):
            items = [o for (k, _), o in self.objects.items() if k == kind and self._match(o, q)]
            return web.json_response(
                {
                    "kind": f"{kind}List",
                    "metadata": {"resourceVersion": str(self.rv)},
                    "items": items,
                }
            )
        self.watches += 1
        since = int(q.get("resourceVersion") or 0)
        timeout = float(q.get("timeoutSeconds") or 30)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        sent = since
        # NOTE: as a real API server, an object that stops matching the selector is sent as
        # DELETED to a watch that saw it match.
        seen = {n for (k, n), o in self.objects.items() if k == kind and self._match(o, q)}
        while loop.time() < deadline:
            for rv, k, etype, obj in list(self.events):
                if rv > sent and k == kind:
                    sent = rv
                    name = obj["metadata"]["name"]
                    if self._match(obj, q):
                        (seen.discard if etype == "DELETED" else seen.add)(name)
                    elif name in seen:
                        seen.discard(name)
                        etype = "DELETED"
                    else:
                        continue
                    await resp.write(json.dumps({"type": etype, "object": obj}).encode() + b"\n")
            async with self.changed:
                try:
                    await asyncio.wait_for(self.changed.wait(), max(0.01, deadline - loop.time()))
                except TimeoutError:
                    break
        await resp.write_eof()
        return resp

    async def _pods(self, request: web.Request) -> web.StreamResponse:
        return await self._list_or_watch(request, "Pod")

    async def _pools(self, request: web.Request) -> web.StreamResponse:
        return await self._list_or_watch(request, "InferencePool")

    async def _pool(self, request: web.Request) -> web.StreamResponse:
        obj = self.objects.get(("InferencePool", request.match_info["name"]))
        if obj is None:
            return web.json_response(
                {"kind": "Status", "code": 404, "reason": "NotFound"}, status=404
            )
        return web.json_response(obj)


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    k = FakeKube()
    await k.start()
    yield k
    await k.stop()


def _client(port: int) -> Any:
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{port}"
    return client.ApiClient(cfg)


def _pool(ports: list[int], labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": "pool", "namespace": NS},
        "spec": {
            "selector": {"matchLabels": labels or {"app": "vllm"}},
            "targetPorts": [{"number": p} for p in ports],
            "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
        },
    }


def _ids(scheduler: Scheduler) -> set[str]:
    return {e.id for e in scheduler.endpoints}


async def test_inference_pool_and_ready_pods_become_the_pool(
    kube: FakeKube, tmp_path: Path
) -> None:
    """Ready matching Pods become one endpoint per target port; NotReady, deleted or
    non-matching Pods leave; a changed InferencePool re-ports the pool; readiness follows the
    first list."""
    await kube.put("InferencePool", _pool([8000, 8001]))
    await kube.put("Pod", _pod("a", "127.0.1.1"))
    await kube.put("Pod", _pod("b", "127.0.1.2", ready=False))
    await kube.put("Pod", _pod("c", "127.0.1.3", labels={"app": "other"}))
    scheduler = Scheduler.from_yaml(ROOT / "config" / "load.yaml")
    d = KubernetesDiscovery(
        scheduler, PoolSpec(namespace=NS, name="pool"), _client(kube.port), scrape=False,
        retry_delay=0.1, watch_timeout=5,
    )  # fmt: skip
    synced: list[bool] = []
    d.on_synced = lambda: synced.append(True)
    d.start()
    try:
        await wait_for(lambda: _ids(scheduler) == {"127.0.1.1:8000", "127.0.1.1:8001"}, 10, "pod a")
        assert synced == [True]
        assert {e.name for e in scheduler.endpoints} == {"a-rank-0", "a-rank-1"}
        assert all(e.namespace == NS and e.labels == {"app": "vllm"} for e in scheduler.endpoints)
        # the pod and its node, for per-pod data read from a node exporter (dcgm-data-source)
        assert {(e.pod, e.node_address) for e in scheduler.endpoints} == {("a", "192.168.7.7")}
        await wait_for(lambda: kube.watches >= 2, 10, "the watches")
        await kube.put("Pod", _pod("b", "127.0.1.2"))  # becomes Ready
        await wait_for(lambda: "127.0.1.2:8000" in _ids(scheduler), 10, "pod b ready")
        await kube.put("Pod", _pod("a", "127.0.1.1", ready=False))  # goes NotReady
        await wait_for(lambda: _ids(scheduler) == {"127.0.1.2:8000", "127.0.1.2:8001"}, 10, "a out")
        await kube.put("Pod", _pod("d", "127.0.1.4"))
        await wait_for(lambda: "127.0.1.4:8001" in _ids(scheduler), 10, "pod d")
        await kube.put("Pod", _pod("d", "127.0.1.4"), "DELETED")
        await wait_for(lambda: "127.0.1.4:8001" not in _ids(scheduler), 10, "pod d deleted")
        await kube.put("Pod", _pod("b", "127.0.1.2", labels={"app": "moved"}))  # stops matching
        await wait_for(lambda: not _ids(scheduler), 10, "pod b relabelled")
        await kube.put("Pod", _pod("b", "127.0.1.2"))
        await kube.put("InferencePool", _pool([9000]))
        await wait_for(lambda: _ids(scheduler) == {"127.0.1.2:9000"}, 10, "the new target port")
    finally:
        await asyncio.to_thread(d.stop)
        scheduler.close()


async def test_selector_and_ports_without_an_inference_pool(kube: FakeKube) -> None:
    """--endpoint-selector and --endpoint-target-ports stand in for an InferencePool."""
    await kube.put("Pod", _pod("a", "127.0.1.1", labels={"app": "vllm", "tier": "gold"}))
    await kube.put("Pod", _pod("b", "127.0.1.2", labels={"app": "vllm"}))
    scheduler = Scheduler.from_yaml(ROOT / "config" / "load.yaml")
    spec = PoolSpec.from_flags(
        pool_name="", namespace=NS, selector="app=vllm,tier=gold", target_ports="8000"
    )
    d = KubernetesDiscovery(scheduler, spec, _client(kube.port), scrape=False, watch_timeout=5)
    d.start()
    try:
        await wait_for(lambda: _ids(scheduler) == {"127.0.1.1:8000"}, 10, "pod a")
    finally:
        await asyncio.to_thread(d.stop)
        scheduler.close()


def test_flags_without_pool_or_selector_are_refused() -> None:
    """A selector without ports (or a malformed one) is a configuration error."""
    with pytest.raises(ConfigError):
        PoolSpec.from_flags(pool_name="", namespace="", selector="app=vllm", target_ports="")
    with pytest.raises(ConfigError):
        PoolSpec.from_flags(pool_name="", namespace="", selector="app", target_ports="80")
    with pytest.raises(ConfigError):
        PoolSpec.from_flags(pool_name="", namespace="", selector="a=b", target_ports="99999")


async def test_readiness_waits_for_the_first_list() -> None:
    """Until discovery has listed the pool, liveness is SERVING and readiness (and the ext_proc
    service) NOT_SERVING; then both serve."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from kvaware_scorer.epp import EndpointPicker, EppConfig

    scheduler = Scheduler.from_yaml(ROOT / "config" / "load.yaml")
    cfg = EppConfig(
        host="127.0.0.1", grpc_port=0, grpc_health_port=0, metrics_port=None, secure_serving=False
    )
    picker = EndpointPicker(scheduler, cfg, own_scheduler=True, synced=False)
    await picker.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{picker.health_port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)

            async def status(service: str) -> int:
                req = health_pb2.HealthCheckRequest(service=service)
                return int((await stub.Check(req, timeout=5)).status)

            serving = health_pb2.HealthCheckResponse.SERVING
            assert await status("liveness") == serving
            assert await status("readiness") != serving
            assert await status("envoy.service.ext_proc.v3.ExternalProcessor") != serving
            picker.mark_synced()
            assert await status("readiness") == serving
            assert await status("envoy.service.ext_proc.v3.ExternalProcessor") == serving
    finally:
        await picker.stop(0)


async def test_the_command_with_pool_name_and_kubeconfig(kube: FakeKube, tmp_path: Path) -> None:
    """``kvaware epp --pool-name --kubeconfig`` lists the pool through the API server, turns
    readiness on, and routes to a Ready Pod's target port."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.conftest import free_port

    from .conftest import Command
    from .test_protocol import Client, _request, _set_headers

    await kube.put("InferencePool", _pool([8000]))
    await kube.put("Pod", _pod("a", "127.0.1.1"))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{kube.port}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    grpc_port, health_port = free_port(), free_port()
    epp = Command(
        [
            "epp", "--config", str(ROOT / "config" / "load.yaml"), "--pool-name", "pool",
            "--pool-namespace", NS, "--kubeconfig", str(kubeconfig), "--host", "127.0.0.1",
            "--grpc-port", str(grpc_port), "--grpc-health-port", str(health_port),
            "--metrics-port", "-1", "--secure-serving=false", "--no-scrape",
        ],
        tmp_path / "epp.log",
    )  # fmt: skip
    try:
        await asyncio.to_thread(epp.wait_line, "serving ext_proc")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            req = health_pb2.HealthCheckRequest(service="readiness")
            for _ in range(250):
                if (
                    await stub.Check(req, timeout=5)
                ).status == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail("readiness never turned SERVING")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            c = Client(ch)
            await c.send(_request(body={"model": "m", "prompt": "x"}))
            headers, _ = await c.read(2)
            dest = _set_headers(headers.request_headers.response)["x-gateway-destination-endpoint"]
            assert dest == "127.0.1.1:8000"
    finally:
        await asyncio.to_thread(epp.stop)
