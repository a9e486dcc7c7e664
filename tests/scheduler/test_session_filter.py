"""``session-affinity-filter`` (tables ported in spirit from upstream's filter/sessionaffinity
tests and test/integration/epp/session_affinity_test.go)."""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler import (
    Endpoint,
    EndpointMetrics,
    Scheduler,
    SchedulingRequest,
    SchedulingResult,
)

from .conftest import FakeClock, build, config, endpoints

CORPUS = Path(__file__).parent / "upstream_corpus" / "session-affinity-filter.yaml"


def token(endpoint_id: str) -> str:
    return base64.b64encode(endpoint_id.encode()).decode()


def plugin(params: dict[str, Any] | None = None, **kw: Any) -> tuple[Scheduler, Any]:
    """A scheduler whose one profile holds the filter, a queue scorer and a picker."""
    entry: dict[str, Any] = {"type": "session-affinity-filter"}
    if params is not None:
        entry["parameters"] = params
    s = build(
        config(
            [entry, {"type": "queue-scorer"}, {"type": "max-score-picker"}],
            [
                {
                    "name": "default",
                    "plugins": [
                        {"pluginRef": "session-affinity-filter"},
                        {"pluginRef": "queue-scorer", "weight": 1},
                        {"pluginRef": "max-score-picker"},
                    ],
                }
            ],
        ),
        seed=0,
        **kw,
    )
    return s, s.plugin("session-affinity-filter")


def req(rid: str, **headers: str) -> SchedulingRequest:
    return SchedulingRequest(rid, "m", token_ids=[1, 2, 3], headers=dict(headers))


def queued(eps: list[Endpoint], *waiting: int) -> list[Endpoint]:
    """Give `eps` waiting-queue sizes (so the queue scorer prefers the shortest)."""
    for e, w in zip(eps, waiting, strict=True):
        e.metrics = EndpointMetrics(waiting_queue_size=w)
    return eps


# -- encoded_endpoint_header ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "headers", "kept"),
    [
        (None, {"x-session-token": token("10.0.0.1:8000")}, [1]),
        ({"encodedEndpointHeaderConfig": {"header": "X-Custom-Session "}}, {"x-custom-session": token("10.0.0.1:8000")}, [1]),
        ({"encodedEndpointHeaderConfig": {"header": "x-custom-session"}}, {"x-session-token": token("10.0.0.1:8000")}, [0, 1, 2]),
        ({"encodedEndpointHeaderConfig": {"header": ""}}, {"x-session-token": token("10.0.0.2:8000")}, [2]),
        (None, {}, [0, 1, 2]),
        (None, {"x-session-token": ""}, [0, 1, 2]),
        (None, {"x-session-token": "garbage-token"}, [0, 1, 2]),
        (None, {"x-session-token": token("10.9.9.9:8000")}, [0, 1, 2]),
    ],
    ids=[
        "token-pins",
        "custom-header-pins",
        "custom-header-ignores-default",
        "empty-header-name-is-default",
        "no-token",
        "empty-token",
        "garbage-token",
        "pod-not-a-candidate",
    ],
)  # fmt: skip
def test_encoded_filter_table(
    params: dict[str, Any] | None, headers: dict[str, str], kept: list[int]
) -> None:
    """A token naming a candidate keeps it alone; anything else keeps every candidate."""
    s, p = plugin(params)
    eps = endpoints(3)
    assert list(p.filter(s.context(), req("r", **headers), eps)) == [eps[i] for i in kept]
    assert list(p.filter(s.context(), req("e", **headers), [])) == []


def test_encoded_round_trip_pins_against_the_scorers() -> None:
    """The first response carries the pick's token; echoing it pins the next request to that pod
    even when the scorers now prefer another one; a new client is placed by the scorers."""
    s, _ = plugin()
    eps = queued(endpoints(3), 5, 0, 5)
    first = s.schedule(req("a"), eps)
    assert first.target is eps[1]
    tok = first.response_headers["x-session-token"]
    assert base64.b64decode(tok).decode() == eps[1].id
    queued(eps, 0, 9, 5)  # pod 1 is now the worst
    second = s.schedule(req("b", **{"x-session-token": tok}), eps)
    assert second.target is eps[1] and second.candidates == [eps[1].id]
    assert second.response_headers["x-session-token"] == tok
    assert s.schedule(req("c"), eps).target is eps[0]


def test_encoded_pinned_pod_gone_falls_back_and_returns_a_new_token() -> None:
    """When the pinned pod is no candidate, the scorers place the request and the client gets the
    new pod's token."""
    s, _ = plugin()
    eps = queued(endpoints(3), 3, 0, 1)
    r = s.schedule(req("a", **{"x-session-token": token(eps[1].id)}), [eps[0], eps[2]])
    assert r.candidates == [eps[0].id, eps[2].id] and r.target is eps[2]
    assert r.response_headers == {"x-session-token": token(eps[2].id)}


@pytest.mark.parametrize(
    "bad",
    [
        "%%%",
        "MTAuMC4wLjE6ODAwMA",  # unpadded
        " " + token("10.0.0.1:8000"),
        token("10.0.0.1:8000") + "\n",
        base64.b64encode(b"\xff\xfe\x00bad").decode(),  # not UTF-8
        token("10.0.0.1:8000") * 200,  # huge, decodes to garbage
        "A" * 10_000_000,  # huge valid alphabet: never decoded
        "\u00e9\u2603",
        token("\x00" * 20),
    ],
    ids=["percent", "unpadded", "leading-space", "newline", "not-utf8", "repeated", "10MB", "unicode", "nul"],
)  # fmt: skip
def test_hostile_tokens_keep_every_candidate_and_schedule(bad: str) -> None:
    """Malformed, oversized or meaningless tokens are no session: every candidate stays, the
    request is scheduled and the client gets a fresh token."""
    s, p = plugin()
    eps = endpoints(3)
    assert list(p.filter(s.context(), req("f", **{"x-session-token": bad}), eps)) == eps
    r = s.schedule(req("s", **{"x-session-token": bad}), eps)
    assert len(r.candidates) == 3
    assert r.response_headers["x-session-token"] == token(r.target.id)


def test_oversized_tokens_are_not_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token longer than MAX_TOKEN_CHARS is no session without being decoded at all."""
    from kvaware_scorer.plugins import session_filter
    from kvaware_scorer.scheduler import sessions

    ok = token("10.0.0.1:8000")
    assert session_filter.decode_token(ok) == "10.0.0.1:8000"
    calls: list[int] = []
    real = base64.b64decode
    monkeypatch.setattr(
        sessions.base64, "b64decode", lambda t, **kw: calls.append(len(t)) or real(t, **kw)
    )
    big = "A" * (session_filter.MAX_TOKEN_CHARS + 4)
    assert session_filter.decode_token(big) == "" and calls == []
    assert session_filter.decode_token(ok) == "10.0.0.1:8000" and calls == [len(ok)]


def test_pd_instances_pin_prefill_and_decode_on_their_own_headers() -> None:
    """The upstream P/D integration config: two instances return decode and prefill tokens on
    their own headers; echoing both pins both profiles."""
    s = build(yaml.safe_load(CORPUS.read_text()), seed=0)
    roles = ["decode", "decode", "prefill", "prefill"]
    eps = [Endpoint(f"{r}-{i}", f"10.1.0.{i}", 8000, {"llm-d.ai/role": r}) for i, r in enumerate(roles)]  # fmt: skip
    queued(eps, 0, 5, 0, 5)
    first = s.schedule(req("a"), eps)
    assert first.target is eps[0] and first.profile_target("prefill") is eps[2]
    headers = dict(first.response_headers)
    assert headers == {
        "x-session-token": token(eps[0].id),
        "x-session-token-prefill": token(eps[2].id),
    }
    queued(eps, 5, 0, 5, 0)
    second = s.schedule(req("b", **headers), eps)
    assert second.target is eps[0] and second.profile_target("prefill") is eps[2]
    assert second.profile_results["prefill"].candidates == [eps[2].id]
    unpinned = s.schedule(req("c"), eps)
    assert unpinned.target is eps[1] and unpinned.profile_target("prefill") is eps[3]
    s.close()


def test_profile_name_without_that_profile_returns_no_token() -> None:
    """Decode-only (the profile handler runs no prefill): the prefill instance writes nothing and
    does not fall back to the decode pod; the decode instance still does."""
    data = yaml.safe_load(CORPUS.read_text())
    handler = next(p for p in data["plugins"] if p["type"] == "disagg-profile-handler")
    handler["parameters"] = {}
    s = build(data, seed=0)
    eps = [Endpoint(f"d{i}", f"10.1.0.{i}", 8000, {"llm-d.ai/role": "decode"}) for i in range(2)]
    r = s.schedule(req("a"), eps)
    assert "prefill" not in r.profile_results
    assert r.response_headers == {"x-session-token": token(r.target.id)}
    s.close()


def test_dry_run_returns_no_token() -> None:
    """An explanation (dry run) runs no pre-request hook, so it hands out no token."""
    s, _ = plugin()
    assert s.schedule(req("a"), endpoints(2), dry_run=True).response_headers == {}


# -- session_id -----------------------------------------------------------------------------------

SESSION_ID = {"strategy": "session_id"}


def test_session_id_binds_pins_and_passes_unbound_through() -> None:
    """The first pick of a session binds it; later requests of the session see that pod alone
    even when the scorers prefer another; other sessions and no session see every pod; nothing
    is returned to the client."""
    s, p = plugin(SESSION_ID)
    eps = queued(endpoints(3), 5, 0, 5)
    first = s.schedule(req("a", **{"x-session-id": "s1"}), eps)
    assert first.target is eps[1] and first.response_headers == {}
    queued(eps, 0, 9, 9)
    again = s.schedule(req("b", **{"x-session-id": " s1 "}), eps)  # trimmed
    assert again.target is eps[1] and again.candidates == [eps[1].id]
    assert list(p.filter(s.context(), req("c", **{"x-session-id": "s2"}), eps)) == eps
    assert list(p.filter(s.context(), req("d"), eps)) == eps
    assert list(p.filter(s.context(), req("e", **{"x-session-id": "   "}), eps)) == eps
    assert s.schedule(req("f", **{"x-session-id": "s2"}), eps).target is eps[0]


def test_session_id_migrates_only_when_the_bound_pod_was_absent() -> None:
    """A bound pod missing from the candidates lets the new pick re-bind the session; a pick that
    merely differs (the bound pod was a candidate, or nothing was recorded) keeps the binding."""
    s, p = plugin(SESSION_ID)
    eps = queued(endpoints(3), 5, 0, 5)
    s.schedule(req("a", **{"x-session-id": "s1"}), eps)
    assert p.bound("s1") == eps[1].id
    moved = s.schedule(req("b", **{"x-session-id": "s1"}), [eps[0], eps[2]])
    assert moved.candidates == [eps[0].id, eps[2].id]
    assert p.bound("s1") == moved.target.id != eps[1].id
    assert list(p.filter(s.context(), req("c", **{"x-session-id": "s1"}), eps)) == [moved.target]

    other = eps[1]
    stray = SchedulingResult([other], "default", [other.id], {}, {}, {})
    present = req("d", **{"x-session-id": "s1"})
    p.filter(s.context(), present, eps)  # bound pod present: recorded as such
    p.pre_request(s.context(), present, stray)
    assert p.bound("s1") == moved.target.id
    p.pre_request(s.context(), req("e", **{"x-session-id": "s1"}), stray)  # nothing recorded
    assert p.bound("s1") == moved.target.id


def test_session_id_bindings_expire_after_the_ttl() -> None:
    """A binding unused for evictionTtlSeconds is gone (the session is placed afresh); use keeps
    it alive; binding any session drops the expired ones."""
    clock = FakeClock()
    s, p = plugin({**SESSION_ID, "sessionIdConfig": {"evictionTtlSeconds": 60}}, clock=clock)
    eps = endpoints(3)
    for sid in ("old", "kept"):
        s.schedule(req(sid, **{"x-session-id": sid}), eps)
    clock.advance(40)
    s.schedule(req("k2", **{"x-session-id": "kept"}), eps)  # refreshed
    clock.advance(30)
    assert p.bound("kept") is not None
    s.schedule(req("new", **{"x-session-id": "new"}), eps)
    assert p.sessions == 2 and p.bound("old") is None
    clock.advance(61)
    assert list(p.filter(s.context(), req("x", **{"x-session-id": "kept"}), eps)) == eps


def test_session_id_bindings_are_bounded() -> None:
    """A client inventing a session id per request holds at most maxSessions bindings (least
    recently used dropped first); the default bound is 100000."""
    s, p = plugin({**SESSION_ID, "sessionIdConfig": {"maxSessions": 10}})
    eps = endpoints(2)
    s.schedule(req("keep", **{"x-session-id": "keep"}), eps)
    for i in range(500):
        if i % 5 == 0:
            p.filter(s.context(), req("k", **{"x-session-id": "keep"}), eps)
            s.schedule(req("k", **{"x-session-id": "keep"}), eps)
        s.schedule(req(f"r{i}", **{"x-session-id": f"sess-{i}"}), eps)
    assert p.sessions == 10
    assert p.bound("keep") is not None and p.bound("sess-0") is None
    assert p.bound("sess-499") is not None
    _, default = plugin(SESSION_ID)
    assert default.bindings.max_sessions == 100_000


def test_huge_session_ids_are_stored_as_digests() -> None:
    """A megabyte session id still pins, but its binding keeps only a fixed-size key."""
    s, p = plugin(SESSION_ID)
    eps = endpoints(3)
    huge = "x" * 1_000_000
    first = s.schedule(req("a", **{"x-session-id": huge}), eps)
    assert list(p.filter(s.context(), req("b", **{"x-session-id": huge}), eps)) == [first.target]
    assert max(len(k) for k in p.bindings._bindings) <= 160
    assert p.bound(huge[:-1] + "y") is None


def test_session_id_sources_in_priority_order() -> None:
    """Sources are tried in order: the header wins over the agent-identity attribute, which pins
    a request that carries no header."""
    params = {
        **SESSION_ID,
        "sessionIdConfig": {"sources": [{"header": "X-Session-ID"}, {"attribute": "agent-identity"}]},
    }  # fmt: skip
    s, p = plugin(params)
    eps = queued(endpoints(3), 5, 0, 5)
    s.schedule(req("a", **{"x-session-id": "sess-A"}), eps)  # sess-A -> pod 1
    queued(eps, 0, 5, 5)
    agent = req("b")
    agent.state["attribute:agent-identity"] = "agent-B"
    assert s.schedule(agent, eps).target is eps[0]  # agent-B -> pod 0
    queued(eps, 5, 5, 0)
    again = req("c")
    again.state["attribute:agent-identity"] = "agent-B"
    assert s.schedule(again, eps).target is eps[0]
    both = req("d", **{"x-session-id": "sess-A"})
    both.state["attribute:agent-identity"] = "agent-B"
    assert s.schedule(both, eps).target is eps[1]
    odd = req("e")
    odd.state["attribute:agent-identity"] = 42  # not a string: no session
    assert list(p.filter(s.context(), odd, eps)) == eps


def test_removed_pods_drop_their_sessions() -> None:
    """A pod leaving the pool drops the sessions bound to it; the next request re-binds."""
    s, p = plugin(SESSION_ID)
    eps = queued(endpoints(3), 5, 0, 5)
    s.set_endpoints(eps)
    s.schedule(req("a", **{"x-session-id": "s1"}))
    s.set_endpoints([eps[0], eps[2]])
    assert p.bound("s1") is None
    r = s.schedule(req("b", **{"x-session-id": "s1"}))
    assert p.bound("s1") == r.target.id


@pytest.mark.parametrize("strategy", ["encoded_endpoint_header", "session_id"])
def test_never_narrows_to_empty(strategy: str) -> None:
    """In every session state the filter leaves at least one of a non-empty candidate set."""
    s, p = plugin({"strategy": strategy})
    eps = endpoints(3)
    gone = Endpoint("gone", "10.9.9.9", 8000)
    for sid, target in (("absent", gone), ("present", eps[0])):
        p.pre_request(s.context(), req(sid, **{"x-session-id": sid}), SchedulingResult([target], "default", [], {}, {}, {}))  # fmt: skip
    cases = [
        {},
        {"x-session-id": "unbound"},
        {"x-session-id": "absent"},
        {"x-session-id": "present"},
        {"x-session-token": token(gone.id)},
        {"x-session-token": token(eps[0].id)},
        {"x-session-token": "!!"},
    ]
    for headers in cases:
        assert len(p.filter(s.context(), req("r", **headers), eps)) >= 1, headers


# -- parameters -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        None,
        {"strategy": "encoded_endpoint_header"},
        {"strategy": "session_id"},
        {"strategy": "session_id", "sessionIdConfig": {"sources": [{"attribute": "agent-identity"}]}},
        {"strategy": "session_id", "sessionIdConfig": {"sources": [{"header": "x-session-id"}, {"attribute": "agent-identity"}]}},
        {"strategy": "session_id", "sessionIdConfig": {"sources": []}},
        {"strategy": "session_id", "sessionIdConfig": {"evictionTtlSeconds": 0}},
        # only the selected strategy's block is checked
        {"sessionIdConfig": {"evictionTtlSeconds": -1, "sources": [{"header": "h", "attribute": "a"}]}},
        {"profileName": "prefill", "encodedEndpointHeaderConfig": {"header": "x-session-token-prefill"}},
    ],
)  # fmt: skip
def test_accepted_parameters(params: dict[str, Any] | None) -> None:
    """What upstream's factory accepts builds here too."""
    plugin(params)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"strategy": "bogus"}, "strategy: 'bogus' is not a valid choice"),
        ({"strategy": ""}, "strategy"),
        (
            {"strategy": "session_id", "sessionIdConfig": {"sources": [{"header": "h", "attribute": "a"}]}},
            "sources[0]: exactly one of header or attribute must be set",
        ),
        (
            {"strategy": "session_id", "sessionIdConfig": {"sources": [{"header": "h"}, {"producer": "p"}]}},
            "sources[1]: exactly one of header or attribute must be set",
        ),
        ({"strategy": "session_id", "sessionIdConfig": {"evictionTtlSeconds": -1}}, "evictionTtlSeconds must be > 0"),
        ({"strategy": "session_id", "sessionIdConfig": {"evictionSweepSeconds": -1}}, "evictionSweepSeconds must be > 0"),
        ({"strategy": "session_id", "sessionIdConfig": {"evictionTtlSeconds": math.nan}}, "evictionTtlSeconds must be > 0"),
        ({"sessionIdConfig": {"maxSessions": 0}}, "maxSessions"),
        ({"headerName": "x"}, "headerName"),
        ({"encodedEndpointHeaderConfig": {"name": "x"}}, "encodedEndpointHeaderConfig.name"),
    ],
)  # fmt: skip
def test_rejected_parameters(params: dict[str, Any], message: str) -> None:
    """What upstream's factory rejects (unknown strategy, a source with both or neither of header
    and attribute, non-positive durations, unknown keys) is a configuration error."""
    with pytest.raises(ConfigError) as info:
        plugin(params)
    assert message in str(info.value)


def test_defaults_filled_as_upstream() -> None:
    """Unset or zero fields take upstream's defaults."""
    _, p = plugin({"strategy": "session_id", "sessionIdConfig": {"evictionTtlSeconds": 0}})
    assert p.bindings.ttl == 300.0 and p.sources == [("x-session-id", "")]
    _, q = plugin()
    assert q.strategy == "encoded_endpoint_header" and q.header == "x-session-token"
    assert q.profile == ""
