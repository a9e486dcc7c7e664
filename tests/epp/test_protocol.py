"""The Endpoint Picker Protocol message by message, over a real gRPC stream to a running EPP
(what Envoy sends, written by the test): answers, order, metadata and immediate responses."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2 as core
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import struct_pb2

from kvaware_scorer.epp import EndpointPicker
from kvaware_scorer.errors import NoEndpointError
from kvaware_scorer.scheduler import hookimpl
from tests.gateway.pods import FakePod

from .conftest import MODEL, Recorder, load_config, reporter_config, start_picker

FULL = pm.ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = pm.ProcessingMode.BUFFERED


def _headers(pairs: dict[str, str], eos: bool = False) -> ep.HttpHeaders:
    return ep.HttpHeaders(
        headers=core.HeaderMap(
            headers=[core.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
        ),
        end_of_stream=eos,
    )


def _request(
    path: str = "/v1/completions",
    body: dict[str, Any] | None = None,
    *,
    mode: int = FULL,
    extra: dict[str, str] | None = None,
    subset: Sequence[str] | None = None,
) -> list[ep.ProcessingRequest]:
    """Envoy's request-phase messages for one request (FULL_DUPLEX: headers, body, empty eos)."""
    hdrs = {":method": "POST" if body is not None else "GET", ":path": path, **(extra or {})}
    md = core.Metadata()
    if subset is not None:
        s = struct_pb2.Struct()
        s.update({"x-gateway-destination-endpoint-subset": list(subset)})
        md.filter_metadata["envoy.lb.subset_hint"].CopyFrom(s)
    pc = ep.ProtocolConfiguration(request_body_mode=mode, response_body_mode=FULL)
    first = ep.ProcessingRequest(
        request_headers=_headers(hdrs, eos=body is None), protocol_config=pc, metadata_context=md
    )
    if body is None:
        return [first]
    raw = json.dumps(body).encode()
    if mode == BUFFERED:
        return [first, ep.ProcessingRequest(request_body=ep.HttpBody(body=raw, end_of_stream=True))]
    return [
        first,
        ep.ProcessingRequest(request_body=ep.HttpBody(body=raw[:10])),
        ep.ProcessingRequest(request_body=ep.HttpBody(body=raw[10:])),
        ep.ProcessingRequest(request_body=ep.HttpBody(body=b"", end_of_stream=True)),
    ]


class Client:
    """One ext_proc stream to the EPP."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = ep_grpc.ExternalProcessorStub(channel).Process()

    async def send(self, msgs: Sequence[ep.ProcessingRequest]) -> None:
        for m in msgs:
            await self.call.write(m)

    async def read(self, n: int, timeout: float = 5.0) -> list[ep.ProcessingResponse]:
        return [await asyncio.wait_for(self.call.read(), timeout) for _ in range(n)]


@pytest.fixture
async def picker(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> AsyncIterator[EndpointPicker]:
    p = await start_picker(tmp_path, pods, recorder)
    yield p
    await p.stop(0)


@pytest.fixture
async def channel(picker: EndpointPicker) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{picker.grpc_port}") as ch:
        yield ch


def _set_headers(resp: ep.CommonResponse) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in resp.header_mutation.set_headers}


def _immediate(resp: ep.ProcessingResponse) -> tuple[int, dict[str, str], dict[str, Any]]:
    ir = resp.immediate_response
    hdrs = {h.header.key: h.header.raw_value.decode() for h in ir.headers.set_headers}
    return int(ir.status.code), hdrs, json.loads(ir.body)


@asynccontextmanager
async def _serving(picker: EndpointPicker) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a started `picker`, which stops when the block exits."""
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{picker.grpc_port}") as ch:
            yield ch
    finally:
        await picker.stop(0)


class _OnePlugin:
    """Hook implementation registering one test plugin type, made by `make`."""

    def __init__(
        self, type_name: str, make: Callable[[], object], kind: str, description: str
    ) -> None:
        self.type_name, self.make, self.kind, self.description = type_name, make, kind, description

    @hookimpl
    def kvaware_register_plugins(self, registry: Any) -> None:
        make = self.make
        registry.register(
            self.type_name,
            lambda params, ctx: make(),
            kinds=(self.kind,),
            description=self.description,
        )


async def _custom_picker(
    tmp_path: Path,
    pods: Sequence[FakePod],
    recorder: Recorder,
    config: dict[str, Any],
    plugin: _OnePlugin,
    **settings: Any,
) -> EndpointPicker:
    """A started plaintext EPP of `config` (with the test plugins and `plugin`) over `pods`,
    its pool from an endpoints file, not scraped."""
    from kvaware_scorer.epp import EppConfig
    from kvaware_scorer.scheduler import Scheduler, make_plugin_manager

    from .conftest import EppTestPlugins, endpoints_yaml

    (tmp_path / "ep.yaml").write_text(endpoints_yaml(pods))
    pm_ = make_plugin_manager(use_env=False, plugins=[EppTestPlugins(recorder), plugin])
    scheduler = Scheduler.from_config(config, plugin_manager=pm_, seed=0)
    scheduler.use_endpoints_file(tmp_path / "ep.yaml", scrape=False)
    cfg = EppConfig(
        host="127.0.0.1",
        grpc_port=0,
        grpc_health_port=0,
        metrics_port=None,
        secure_serving=False,
        **settings,
    )
    picker = EndpointPicker(scheduler, cfg, own_scheduler=True)
    await picker.start()
    return picker


async def test_full_duplex_answers_after_the_body_in_order(
    channel: grpc.aio.Channel, pods: list[FakePod]
) -> None:
    """Nothing is answered before the body ends; then the headers answer (destination header,
    clear_route_cache, the same value in envoy.lb metadata) and the body, streamed back whole."""
    c = Client(channel)
    body = {"model": MODEL, "prompt": "hello"}
    msgs = _request(body=body)
    await c.send(msgs[:-1])
    pending = asyncio.ensure_future(c.call.read())
    done, _ = await asyncio.wait({pending}, timeout=0.3)
    assert not done, "answered before the end of the body"
    await c.send(msgs[-1:])
    headers = await asyncio.wait_for(pending, 5)
    (streamed,) = await c.read(1)
    common = headers.request_headers.response
    dest = _set_headers(common)["x-gateway-destination-endpoint"]
    assert dest in {f"127.0.0.1:{p.port}" for p in pods}
    assert common.clear_route_cache
    lb = headers.dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert lb["x-gateway-destination-endpoint"].string_value == dest
    sr = streamed.request_body.response.body_mutation.streamed_response
    assert sr.end_of_stream and json.loads(sr.body) == body


async def test_buffered_answers_headers_at_once_and_routes_on_the_body(
    channel: grpc.aio.Channel,
) -> None:
    """Under BUFFERED the headers are answered at once and the destination rides on the body
    answer (header mutation and metadata)."""
    c = Client(channel)
    msgs = _request(body={"model": MODEL, "prompt": "x"}, mode=BUFFERED)
    await c.send(msgs[:1])
    (first,) = await c.read(1)
    assert first.HasField("request_headers")
    assert not first.request_headers.response.header_mutation.set_headers
    await c.send(msgs[1:])
    (body,) = await c.read(1)
    common = body.request_body.response
    dest = _set_headers(common)["x-gateway-destination-endpoint"]
    assert common.clear_route_cache
    lb = body.dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert lb["x-gateway-destination-endpoint"].string_value == dest


async def test_a_request_without_body_is_routed_on_its_headers(channel: grpc.aio.Channel) -> None:
    """A GET (end of stream on the headers) is routed at once."""
    c = Client(channel)
    await c.send(_request("/v1/models"))
    (resp,) = await c.read(1)
    assert "x-gateway-destination-endpoint" in _set_headers(resp.request_headers.response)


async def test_subset_hint_restricts_the_pick(
    channel: grpc.aio.Channel, pods: list[FakePod]
) -> None:
    """Only endpoints of the hint are picked; an empty hint or one outside the pool is a 503
    with the dropped reason; a hint is ignored by --disable-endpoint-subset-filter."""
    allowed = [f"127.0.0.1:{pods[1].port}", "127.0.0.1:1"]
    for _ in range(5):
        c = Client(channel)
        await c.send(_request(body={"model": MODEL, "prompt": "x"}, subset=allowed))
        headers, _ = await c.read(2)
        assert (
            _set_headers(headers.request_headers.response)["x-gateway-destination-endpoint"]
            == allowed[0]
        )
    for subset in ([], ["127.0.0.1:1"]):
        c = Client(channel)
        await c.send(_request(body={"model": MODEL, "prompt": "x"}, subset=subset))
        (resp,) = await c.read(1)
        status, hdrs, body = _immediate(resp)
        assert status == 503
        assert hdrs["x-llm-d-request-dropped-reason"] == "rejected-no-endpoints"
        assert body["error"]["code"] == "no_endpoint"


async def test_subset_filter_can_be_disabled(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> None:
    """With the subset filter off, a hint matching nothing does not stop routing."""
    async with _serving(await start_picker(tmp_path, pods, recorder, subset_filter=False)) as ch:
        c = Client(ch)
        await c.send(_request(body={"model": MODEL, "prompt": "x"}, subset=["127.0.0.1:1"]))
        headers, _ = await c.read(2)
        assert headers.HasField("request_headers")


async def test_bad_and_oversized_bodies_are_answered_by_the_epp(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> None:
    """An unreadable completion is a 400 in the OpenAI error shape; a body over the limit is a
    413 before the rest arrives."""
    async with _serving(await start_picker(tmp_path, pods, recorder, max_body_bytes=2048)) as ch:
        c = Client(ch)
        msgs = _request(body={"model": MODEL, "prompt": "x"})
        msgs[1] = ep.ProcessingRequest(request_body=ep.HttpBody(body=b"{not json"))
        await c.send(msgs)
        (resp,) = await c.read(1)
        status, _, body = _immediate(resp)
        assert status == 400 and body["error"]["code"] == "invalid_json"
        c = Client(ch)
        await c.send(_request(body={"model": MODEL, "prompt": "x" * 4000})[:3])
        (resp,) = await c.read(1)
        assert _immediate(resp)[0] == 413


async def test_over_max_streams_is_429_rejected_saturated(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> None:
    """A request over the stream limit is shed with 429 and upstream's dropped reason."""
    async with _serving(await start_picker(tmp_path, pods, recorder, max_streams=1)) as ch:
        held = Client(ch)
        await held.send(_request(body={"model": MODEL, "prompt": "x"})[:1])
        await asyncio.sleep(0.2)
        c = Client(ch)
        await c.send(_request(body={"model": MODEL, "prompt": "x"})[:1])
        (resp,) = await c.read(1)
        status, hdrs, _ = _immediate(resp)
        assert status == 429
        assert hdrs["x-llm-d-request-dropped-reason"] == "rejected-saturated"


async def test_response_phase_feeds_the_accounting(
    channel: grpc.aio.Channel, recorder: Recorder
) -> None:
    """The served endpoint from envoy.lb, the status and the SSE usage reach post_response once;
    every response chunk is echoed with its end-of-stream flag."""
    c = Client(channel)
    await c.send(_request(body={"model": MODEL, "prompt": "x", "stream": True}))
    headers, _ = await c.read(2)
    dest = _set_headers(headers.request_headers.response)["x-gateway-destination-endpoint"]
    md = core.Metadata()
    s = struct_pb2.Struct()
    s.update({"x-gateway-destination-endpoint-served": dest})
    md.filter_metadata["envoy.lb"].CopyFrom(s)
    await c.send(
        [
            ep.ProcessingRequest(
                response_headers=_headers({":status": "200", "content-type": "text/event-stream"}),
                metadata_context=md,
            )
        ]
    )
    (rh,) = await c.read(1)
    assert _set_headers(rh.response_headers.response)["x-kvaware-endpoint"] == dest
    usage = {
        "prompt_tokens": 7,
        "completion_tokens": 2,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    chunks = [
        b'data: {"choices": [{"text": "a"}]}\n\n',
        b'data: {"choices": [], "usage": ' + json.dumps(usage).encode() + b"}\n\n",
        b"data: [DONE]\n\n",
    ]
    for chunk in chunks:
        await c.send([ep.ProcessingRequest(response_body=ep.HttpBody(body=chunk))])
        (echo,) = await c.read(1)
        sr = echo.response_body.response.body_mutation.streamed_response
        assert sr.body == chunk and not sr.end_of_stream
    assert not recorder.calls
    await c.send([ep.ProcessingRequest(response_body=ep.HttpBody(end_of_stream=True))])
    (last,) = await c.read(1)
    assert last.response_body.response.body_mutation.streamed_response.end_of_stream
    (request, target, info) = recorder.calls[0]
    assert len(recorder.calls) == 1 and target == dest
    timing = request.state["epp"]
    assert timing["served"] == dest and 0 <= timing["first_byte_s"] <= timing["duration_s"]
    assert (info.status, info.prompt_tokens, info.completion_tokens, info.cached_tokens) == (
        200,
        7,
        2,
        4,
    )


@pytest.mark.parametrize(
    ("stream", "ending"),
    [(True, "body"), (False, "body"), (True, "trailers"), (False, "buffered"), (True, "buffered")],
)
async def test_reported_attribute_rides_on_the_answer_ending_the_response(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder, stream: bool, ending: str
) -> None:
    """``request-attribute-reporter``'s value is ``envoy.lb`` dynamic metadata on the answer to
    the message ending the response (its last body message, or its trailers), on no earlier
    answer; with a buffered response too. The first chunk of an SSE answer passed on as it
    comes is reported as the first token, once; a JSON answer, or any answer Envoy buffers,
    is scheduled as not streamed and reports none."""
    picker = await start_picker(
        tmp_path, pods, recorder, config=reporter_config("usage.completion_tokens > 0")
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{picker.grpc_port}") as ch:
            c = Client(ch)
            msgs = _request(body={"model": MODEL, "prompt": "x", "stream": stream})
            if ending == "buffered":
                msgs[0].protocol_config.response_body_mode = BUFFERED
            await c.send(msgs)
            await c.read(2)
            ctype = "text/event-stream" if stream else "application/json"
            await c.send(
                [
                    ep.ProcessingRequest(
                        response_headers=_headers({":status": "200", "content-type": ctype})
                    )
                ]
            )
            (rh,) = await c.read(1)
            assert not rh.HasField("dynamic_metadata")
            usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
            if stream:
                chunks = [
                    b'data: {"choices": [{"text": "a"}]}\n\n',
                    b'data: {"choices": [], "usage": ' + json.dumps(usage).encode() + b"}\n\n",
                    b"data: [DONE]\n\n",
                ]
            else:
                chunks = [json.dumps({"choices": [{"text": "ab"}], "usage": usage}).encode()]
            if ending != "buffered":
                for chunk in chunks:
                    await c.send([ep.ProcessingRequest(response_body=ep.HttpBody(body=chunk))])
                    (echo,) = await c.read(1)
                    assert not echo.HasField("dynamic_metadata")
            if ending == "trailers":
                await c.send([ep.ProcessingRequest(response_trailers=ep.HttpTrailers())])
                (last,) = await c.read(1)
                assert last.HasField("response_trailers")
            else:
                body = b"".join(chunks) if ending == "buffered" else b""
                await c.send(
                    [ep.ProcessingRequest(response_body=ep.HttpBody(body=body, end_of_stream=True))]
                )
                (last,) = await c.read(1)
                assert last.HasField("response_body")
                if ending == "body":
                    assert last.response_body.response.body_mutation.streamed_response.end_of_stream
            lb = last.dynamic_metadata.fields["envoy.lb"].struct_value.fields
            assert lb["x-gateway-inference-request-cost"].number_value == 9.0
            await c.call.done_writing()
        ((rid, _),) = recorder.scheduled
        as_it_comes = stream and ending != "buffered"
        assert recorder.streaming[rid] is as_it_comes
        assert recorder.first_tokens == ([rid] if as_it_comes else [])
    finally:
        await picker.stop(0)


async def test_a_stream_cut_before_the_response_ends_is_accounted_once(
    channel: grpc.aio.Channel, recorder: Recorder, picker: EndpointPicker
) -> None:
    """When Envoy ends the stream early (client gone), post_response still runs once (499)."""
    c = Client(channel)
    await c.send(_request(body={"model": MODEL, "prompt": "x"}))
    await c.read(2)
    await c.call.done_writing()
    for _ in range(100):
        if recorder.calls:
            break
        await asyncio.sleep(0.02)
    assert len(recorder.calls) == 1 and recorder.calls[0][2].status == 499
    assert picker.inflight == 0


class _TwoProfiles:
    """A P/D-style profile handler: runs ``decode`` and ``prefill``; ``decode`` is primary."""

    def pick_profiles(self, ctx: Any, request: Any, profiles: Any, results: Any) -> list[str]:
        return [] if results else ["decode", "prefill"]

    def process_results(self, ctx: Any, request: Any, results: Any) -> str:
        return "decode"


async def test_prefill_pick_sets_the_prefiller_header(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> None:
    """When the result carries a ``prefill`` profile pick, its endpoint goes in
    ``x-prefiller-host-port`` for the decode pod's sidecar; scores are emitted on request."""
    config = load_config()
    config["plugins"] += [
        {"type": "test-pd-handler"},
        {
            "type": "label-selector-filter",
            "name": "prefill-pods",
            "parameters": {"matchLabels": {}},
        },
    ]
    config["schedulingProfiles"] = [
        {"name": "decode", "plugins": [{"pluginRef": "queue-scorer"}, {"pluginRef": "max-score-picker"}]},
        {"name": "prefill", "plugins": [{"pluginRef": "prefill-pods"}, {"pluginRef": "max-score-picker"}]},
    ]  # fmt: skip
    plugin = _OnePlugin(
        "test-pd-handler", _TwoProfiles, "profile-handler", "decode + prefill (tests)"
    )
    picker = await _custom_picker(
        tmp_path, pods, recorder, config, plugin, emit_endpoint_scores=True
    )
    async with _serving(picker) as ch:
        c = Client(ch)
        await c.send(_request(body={"model": MODEL, "prompt": "x"}))
        headers, _ = await c.read(2)
        hdrs = _set_headers(headers.request_headers.response)
        ids = {f"127.0.0.1:{p.port}" for p in pods}
        assert hdrs["x-prefiller-host-port"] in ids
        lb = headers.dynamic_metadata.fields["envoy.lb"].struct_value.fields
        scores = lb["x-gateway-destination-endpoint-scores"].string_value
        assert {s.rsplit(":", 1)[0] for s in scores.split(",")} == ids


async def test_a_decision_abandoned_by_envoy_is_released(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> None:
    """When Envoy drops the stream while the (slow) decision is being made, the decision's
    pre-request hooks are still released once it completes (post_response, 499)."""
    picker = await start_picker(tmp_path, pods, recorder, slow=0.5)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{picker.grpc_port}") as ch:
            c = Client(ch)
            await c.send(_request(body={"model": MODEL, "prompt": "x"}))
            await asyncio.sleep(0.2)
            c.call.cancel()
            for _ in range(100):
                if recorder.calls:
                    break
                await asyncio.sleep(0.02)
        assert len(recorder.scheduled) == 1
        assert len(recorder.calls) == 1 and recorder.calls[0][2].status == 499
    finally:
        await picker.stop(0)


async def test_conformance_hooks(tmp_path: Path, pods: list[FakePod], recorder: Recorder) -> None:
    """With --test-hooks, ``test-epp-endpoint-selection`` restricts the pick (by IP or
    ``ip:port``) and the served endpoint is echoed in ``x-conformance-test-served-endpoint``."""
    async with _serving(await start_picker(tmp_path, pods, recorder, test_hooks=True)) as ch:
        only = f"127.0.0.1:{pods[2].port}"
        for _ in range(4):
            c = Client(ch)
            extra = {"test-epp-endpoint-selection": f"{only},10.9.9.9"}
            await c.send(_request(body={"model": MODEL, "prompt": "x"}, extra=extra))
            headers, _ = await c.read(2)
            hdrs = _set_headers(headers.request_headers.response)
            assert hdrs["x-gateway-destination-endpoint"] == only
            await c.send([ep.ProcessingRequest(response_headers=_headers({":status": "200"}))])
            (rh,) = await c.read(1)
            served = _set_headers(rh.response_headers.response)
            assert served["x-conformance-test-served-endpoint"] == only
            await c.call.done_writing()


async def test_a_batch_prompt_that_is_not_utf8_is_a_400(channel: grpc.aio.Channel) -> None:
    """A prompt batch with invalid UTF-8 is answered 400 by the EPP, never a 500."""
    c = Client(channel)
    msgs = _request(body={"model": MODEL, "prompt": "x"})
    raw = b'{"model": "test-model", "prompt": ["\xff"]}'
    msgs[1:] = [ep.ProcessingRequest(request_body=ep.HttpBody(body=raw, end_of_stream=True))]
    await c.send(msgs)
    (resp,) = await c.read(1)
    assert _immediate(resp)[0] == 400


class _HeaderHook:
    """A pre-request hook setting routing headers and client headers on the result."""

    def pre_request(self, ctx: Any, request: Any, result: Any) -> None:
        result.headers = {
            "x-prefiller-host-port": "127.0.0.9:8000",
            "x-data-parallel-host-port": "127.0.0.1:8001",
        }
        result.response_headers = {"x-session-token": "tok-1"}


async def test_routing_and_response_headers_of_the_result(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> None:
    """Routing headers the pre-request hooks put on the result go to the target (a client's own
    copies removed), and the result's response headers go back to the client."""
    config = load_config()
    config["plugins"].append({"type": "test-header-hook"})
    plugin = _OnePlugin(
        "test-header-hook", _HeaderHook, "pre-request", "sets result headers (tests)"
    )
    async with _serving(await _custom_picker(tmp_path, pods, recorder, config, plugin)) as ch:
        c = Client(ch)
        extra = {"x-encoder-hosts-ports": "6.6.6.6:1", "x-prefiller-host-port": "6.6.6.6:2"}
        await c.send(_request(body={"model": MODEL, "prompt": "x"}, extra=extra))
        headers, _ = await c.read(2)
        common = headers.request_headers.response
        hdrs = _set_headers(common)
        assert hdrs["x-prefiller-host-port"] == "127.0.0.9:8000"
        assert hdrs["x-data-parallel-host-port"] == "127.0.0.1:8001"
        assert "x-encoder-hosts-ports" in common.header_mutation.remove_headers
        assert "x-prefiller-host-port" not in common.header_mutation.remove_headers
        await c.send([ep.ProcessingRequest(response_headers=_headers({":status": "200"}))])
        (rh,) = await c.read(1)
        assert _set_headers(rh.response_headers.response)["x-session-token"] == "tok-1"


class _Shed(NoEndpointError):
    status = 429


class _Shedder:
    """A filter that sheds every request, as admission control under overload does."""

    def filter(self, ctx: Any, request: Any, endpoints: Any) -> Any:
        raise _Shed("over the queue limit")


async def test_a_shed_request_is_429_rejected_saturated(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> None:
    """A scheduling error carrying status 429 (admission or flow control shedding) becomes a
    429 with ``rejected-saturated``; nothing is scheduled."""
    config = load_config()
    config["plugins"].append({"type": "test-shedder"})
    config["schedulingProfiles"][0]["plugins"].insert(0, {"pluginRef": "test-shedder"})
    plugin = _OnePlugin("test-shedder", _Shedder, "filter", "sheds")
    async with _serving(await _custom_picker(tmp_path, pods, recorder, config, plugin)) as ch:
        c = Client(ch)
        await c.send(_request(body={"model": MODEL, "prompt": "x"}))
        (resp,) = await c.read(1)
        status, hdrs, body = _immediate(resp)
        assert status == 429 and hdrs["x-llm-d-request-dropped-reason"] == "rejected-saturated"
        assert body["error"]["code"] == "rejected"
        assert not recorder.scheduled
