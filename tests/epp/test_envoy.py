"""A real Envoy in front of OpenAI-like pods and an in-process `kvaware epp`: body modes, subset
hint, model rewrite, failure behaviour of the shipped bootstrap, a pod dying mid-stream."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import free_port
from tests.gateway.pods import FakePod

from .conftest import MODEL, Recorder, start_picker, wait_for

pytestmark = pytest.mark.slow


async def _post(url: str, path: str, body: dict[str, Any], **kw: Any) -> tuple[int, Any, str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s,
        s.post(url + path, json=body, **kw) as r,
    ):
        return r.status, r.headers, await r.text()


async def test_full_duplex_routes_streams_and_accounts(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder, envoys: Any
) -> None:
    """Completions and chat, streamed and not, reach the pod the EPP named; usage and the end
    of each response reach the post-response hooks exactly once, and each streamed answer's
    first token the first-token listeners."""
    picker = await start_picker(tmp_path, pods, recorder)
    try:
        envoy = await envoys(picker.grpc_port, picker.scheduler.endpoints)
        ids = {f"127.0.0.1:{p.port}": p for p in pods}
        for stream in (False, True):
            for path, body in (
                ("/v1/completions", {"model": MODEL, "prompt": "hello there"}),
                ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
            ):  # fmt: skip
                if stream:
                    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
                status, headers, text = await _post(
                    envoy.url, path, body, headers={"x-prefiller-host-port": "10.6.6.6:1"}
                )
                assert status == 200, text
                served = headers["x-kvaware-endpoint"]
                pod = ids[served]
                assert "x-prefiller-host-port" not in pod.requests[-1]["headers"]
                assert pod.requests[-1]["path"] == path
                assert pod.requests[-1]["headers"]["x-gateway-destination-endpoint"] == served
                if stream:
                    assert text.rstrip().endswith("data: [DONE]")
                else:
                    assert json.loads(text)["system_fingerprint"] == pod.name
        await wait_for(lambda: len(recorder.calls) == 4, what="4 post_response calls")
        assert len({r.request_id for r, _, _ in recorder.calls}) == 4
        for _request, target, info in recorder.calls:
            assert info.status == 200 and info.error is None
            assert info.completion_tokens == 3  # the pods' default, from the body or SSE usage
            assert info.cached_tokens == 16 * int(ids[target].name[-1])
        # NOTE: the two SSE answers report their first token through Envoy, once each; the
        # whole-body ones are scheduled as not streamed.
        streamed = sorted(rid for rid, flag in recorder.streaming.items() if flag)
        assert sorted(recorder.first_tokens) == streamed and len(streamed) == 2
        assert sorted(recorder.streaming.values()) == [False, False, True, True]
        await wait_for(lambda: picker.inflight == 0, what="the streams to close")
    finally:
        await picker.stop()


async def test_subset_hint_is_honoured_and_an_empty_fit_is_503(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder, envoys: Any
) -> None:
    """With a subset hint every request lands inside it; a hint naming no pool endpoint is a 503
    carrying upstream's dropped-reason header."""
    picker = await start_picker(tmp_path, pods, recorder)
    try:
        eps = picker.scheduler.endpoints
        only = f"127.0.0.1:{pods[2].port}"
        inside = await envoys(picker.grpc_port, eps, subset_hint=[only])
        for _ in range(6):
            status, headers, _ = await _post(
                inside.url, "/v1/completions", {"model": MODEL, "prompt": "x"}
            )
            assert status == 200 and headers["x-kvaware-endpoint"] == only
        outside = await envoys(picker.grpc_port, eps, subset_hint=[f"127.0.0.1:{free_port()}"])
        status, headers, text = await _post(
            outside.url, "/v1/completions", {"model": MODEL, "prompt": "x"}
        )
        assert status == 503, text
        assert headers["x-llm-d-request-dropped-reason"] == "rejected-no-endpoints"
        assert json.loads(text)["error"]["code"] == "no_endpoint"
    finally:
        await picker.stop()


async def test_buffered_mode_routes_and_rewrites_the_model(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder, envoys: Any
) -> None:
    """Under BUFFERED (Envoy AI Gateway) the routing answer rides on the body answer; the model
    rewrite header reaches the pod as the new model and the client sees its own."""
    picker = await start_picker(tmp_path, pods, recorder)
    try:
        envoy = await envoys(
            picker.grpc_port,
            picker.scheduler.endpoints,
            request_body_mode="BUFFERED",
            response_body_mode="STREAMED",
        )
        status, headers, text = await _post(
            envoy.url,
            "/v1/completions",
            {"model": MODEL, "prompt": "hello"},
            headers={"x-gateway-model-name-rewrite": "rewritten-model"},
        )
        assert status == 200, text
        pod = next(p for p in pods if f"127.0.0.1:{p.port}" == headers["x-kvaware-endpoint"])
        assert pod.requests[-1]["body"]["model"] == "rewritten-model"
        assert json.loads(text)["model"] == MODEL
        body = {"model": MODEL, "prompt": "again", "stream": True}
        status, headers, text = await _post(envoy.url, "/v1/completions", body)
        assert status == 200 and text.rstrip().endswith("data: [DONE]")
    finally:
        await picker.stop()


async def test_epp_down_is_500_as_the_failure_table_says(
    tmp_path: Path, pods: list[FakePod], envoys: Any
) -> None:
    """With the shipped FULL_DUPLEX bootstrap (failure_mode_allow false) and no EPP listening,
    a request is a 500 from Envoy; it never reaches a pod."""
    from kvaware_scorer.scheduler import Endpoint

    eps = [Endpoint(p.name, "127.0.0.1", p.port) for p in pods]
    envoy = await envoys(free_port(), eps, wait_epp=False)
    status, _, _ = await _post(envoy.url, "/v1/completions", {"model": MODEL, "prompt": "x"})
    assert status == 500
    assert all(not p.requests for p in pods)


async def test_slow_epp_is_waited_out(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder, envoys: Any
) -> None:
    """A slow decision (1.5 s) is waited for under FULL_DUPLEX (no message timeout): 200."""
    picker = await start_picker(tmp_path, pods, recorder, slow=1.5)
    try:
        envoy = await envoys(picker.grpc_port, picker.scheduler.endpoints)
        t0 = time.perf_counter()
        status, _, text = await _post(envoy.url, "/v1/completions", {"model": MODEL, "prompt": "x"})
        assert status == 200, text
        assert time.perf_counter() - t0 >= 1.4
    finally:
        await picker.stop()


async def test_pod_killed_mid_stream(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder, envoys: Any
) -> None:
    """A pod dying mid-stream cuts the client's stream; the EPP still closes the request's
    accounting once (nothing left in flight) and routes the next request."""
    picker = await start_picker(tmp_path, pods, recorder)
    try:
        envoy = await envoys(picker.grpc_port, picker.scheduler.endpoints)
        body = {
            "model": MODEL,
            "prompt": "x",
            "stream": True,
            "test_pod": {"chunks": 6, "die_after": 2, "delay": 0.05},
        }
        with pytest.raises(aiohttp.ClientPayloadError):
            await _post(envoy.url, "/v1/completions", body)
        await wait_for(lambda: len(recorder.calls) == 1, what="the accounting of the cut stream")
        _, _, info = recorder.calls[0]
        assert info.error is not None
        await wait_for(lambda: picker.inflight == 0, what="the streams to close")
        status, _, _ = await _post(envoy.url, "/v1/completions", {"model": MODEL, "prompt": "y"})
        assert status == 200
        await wait_for(lambda: len(recorder.calls) == 2)
    finally:
        await picker.stop()


async def test_tls_to_the_epp(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder, envoys: Any
) -> None:
    """With --secure-serving (the default) Envoy dials the EPP over TLS (self-signed, no
    verification, as gateways do) and its gRPC health check passes."""
    picker = await start_picker(tmp_path, pods, recorder, secure_serving=True)
    try:
        envoy = await envoys(picker.grpc_port, picker.scheduler.endpoints, epp_tls=True)
        status, _, text = await _post(envoy.url, "/v1/completions", {"model": MODEL, "prompt": "x"})
        assert status == 200, text
        plain = await envoys(picker.grpc_port, picker.scheduler.endpoints, wait_epp=False)
        status, _, _ = await _post(plain.url, "/v1/completions", {"model": MODEL, "prompt": "x"})
        assert status == 500  # a plaintext gateway cannot talk to a TLS EPP
    finally:
        await picker.stop()


async def test_in_process_drain_lets_a_stream_finish(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder, envoys: Any
) -> None:
    """`stop` turns readiness off and waits for a stream in progress: it ends complete."""
    picker = await start_picker(tmp_path, pods, recorder)
    envoy = await envoys(picker.grpc_port, picker.scheduler.endpoints)
    body = {"model": MODEL, "prompt": "x", "stream": True, "test_pod": {"chunks": 10, "delay": 0.1}}
    task = asyncio.create_task(_post(envoy.url, "/v1/completions", body))
    await wait_for(lambda: picker.inflight == 1, what="the stream to start")
    await asyncio.sleep(0.2)
    await picker.stop()
    assert not picker.ready
    status, _, text = await task
    assert status == 200 and text.rstrip().endswith("data: [DONE]")
    assert text.count("data: {") == 10


async def test_ordered_fallback_list_and_served_endpoint(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder, envoys: Any
) -> None:
    """With several targets the EPP sends an ordered list; Envoy's override-host balancer skips
    an endpoint it does not have and reports the one that served, which the EPP's accounting
    and the response header follow."""
    from kvaware_scorer.scheduler import Endpoint

    from .conftest import load_config

    config = load_config()
    config["plugins"] = [
        {"type": "max-score-picker", "parameters": {"maxNumOfEndpoints": 4}},
        {"type": "test-recorder"},
    ]
    config["schedulingProfiles"][0]["plugins"] = [{"pluginRef": "max-score-picker"}]
    ghost = FakePod("ghost", MODEL)
    ghost.port = free_port()  # in the EPP's pool, not in Envoy's cluster, not listening
    picker = await start_picker(tmp_path, [*pods, ghost], recorder, config=config)
    try:
        real = [Endpoint(p.name, "127.0.0.1", p.port) for p in pods]  # type: ignore[arg-type]
        envoy = await envoys(picker.grpc_port, real)
        ghost_id = f"127.0.0.1:{ghost.port}"
        served: list[str] = []
        for _ in range(30):
            status, headers, text = await _post(
                envoy.url, "/v1/completions", {"model": MODEL, "prompt": "x"}
            )
            assert status == 200, text
            served.append(headers["x-kvaware-endpoint"])
        assert ghost_id not in served
        sent = [
            p.requests[-1]["headers"]["x-gateway-destination-endpoint"] for p in pods if p.requests
        ]
        assert all(len(v.split(",")) == 4 for v in sent)
        await wait_for(lambda: len(recorder.calls) == 30)
        primaries = dict(recorder.scheduled)
        moved = [
            (primaries[r.request_id], t)
            for r, t, _ in recorder.calls
            if primaries[r.request_id] == ghost_id
        ]
        assert moved, "the ghost was never the primary pick"
        assert all(t != ghost_id for _, t in moved)
    finally:
        await picker.stop()


async def test_fail_open_needs_buffered_and_override_host(pods: list[FakePod], envoys: Any) -> None:
    """With the EPP down, failure_mode_allow under BUFFERED + override-host serves through the
    round-robin fallback (a FailOpen pool), while FULL_DUPLEX still answers 500."""
    from kvaware_scorer.scheduler import Endpoint

    eps = [Endpoint(p.name, "127.0.0.1", p.port) for p in pods]
    down = free_port()
    fail_open = await envoys(
        down,
        eps,
        wait_epp=False,
        request_body_mode="BUFFERED",
        response_body_mode="STREAMED",
        failure_mode_allow=True,
    )
    status, _, text = await _post(fail_open.url, "/v1/completions", {"model": MODEL, "prompt": "x"})
    assert status == 200, text
    assert sum(len(p.requests) for p in pods) == 1
    duplex = await envoys(down, eps, wait_epp=False, failure_mode_allow=True)
    status, _, _ = await _post(duplex.url, "/v1/completions", {"model": MODEL, "prompt": "x"})
    assert status == 500


async def test_estimated_prefix_routing_history_through_the_epp(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder, envoys: Any
) -> None:
    """The approximate prefix producer's pre-request history works through the EPP: requests
    sharing a long prefix follow the first one's pod (config/estimated.yaml)."""
    import yaml

    from .conftest import ROOT

    config = yaml.safe_load((ROOT / "config" / "estimated.yaml").read_text())
    config["plugins"].append({"type": "test-recorder"})
    picker = await start_picker(tmp_path, pods, recorder, config=config)
    try:
        envoy = await envoys(picker.grpc_port, picker.scheduler.endpoints)
        for group in range(3):
            prefix = f"group {group} " + " ".join(f"w{group}x{i}" for i in range(400))
            first = None
            for q in range(4):
                body = {"model": MODEL, "prompt": f"{prefix} question {q}"}
                status, headers, text = await _post(envoy.url, "/v1/completions", body)
                assert status == 200, text
                pod = headers["x-kvaware-endpoint"]
                first = first or pod
                assert pod == first, f"group {group} question {q} left its pod"
    finally:
        await picker.stop()


async def test_request_cost_reaches_envoy_as_dynamic_metadata(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder, envoys: Any
) -> None:
    """``request-attribute-reporter``'s token cost of each response, streamed or not, is in
    Envoy's ``envoy.lb`` dynamic metadata when the request ends (its access log shows it)."""
    from .conftest import reporter_config

    config = reporter_config()
    picker = await start_picker(tmp_path, pods, recorder, config=config)
    try:
        envoy = await envoys(picker.grpc_port, picker.scheduler.endpoints)
        prompts = ["one two three", "one two three four five six seven"]
        for prompt, stream in zip(prompts, (False, True), strict=True):
            body: dict[str, Any] = {"model": MODEL, "prompt": prompt}
            if stream:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
            status, _, text = await _post(envoy.url, "/v1/completions", body)
            assert status == 200, text
        await wait_for(lambda: len(recorder.calls) == 2, what="2 post_response calls")
        costs = [info.prompt_tokens + info.completion_tokens for _, _, info in recorder.calls]
        assert len(set(costs)) == 2 and all(c > 0 for c in costs)
        log = envoy.process.log_path
        assert log is not None

        def logged() -> list[int]:
            found = re.findall(r'"x-gateway-inference-request-cost":(\d+)', log.read_text())
            return [int(v) for v in found]

        await wait_for(lambda: sorted(logged()) == sorted(costs), what="the costs in the log")
    finally:
        await picker.stop()
