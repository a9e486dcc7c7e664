"""``header-profile-handler``: one profile per request, named by a request header (ported in
spirit from upstream's factory, Pick and ProcessResults test tables)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kvaware_scorer.errors import ConfigError, NoEndpointError, RequestRejectedError
from kvaware_scorer.plugins.headerprofile import (
    MAX_SHOWN_VALUE,
    HeaderProfileHandler,
    HeaderProfileHandlerParams,
)
from kvaware_scorer.scheduler import (
    Endpoint,
    PluginContext,
    PluginRegistry,
    ProfileResult,
    SchedulingContext,
    SchedulingRequest,
    load_config,
)

from .conftest import build, config

ROLE = "llm-d.ai/role"
CORPUS = Path(__file__).parent / "upstream_corpus" / "header-profile-handler.yaml"


def stage_config(
    params: dict[str, Any] | None = None, stages: tuple[str, ...] = ("encode", "prefill", "decode")
) -> dict[str, Any]:
    """One profile per stage, each keeping its role's pods."""
    handler: dict[str, Any] = {"type": "header-profile-handler"}
    if params is not None:
        handler["parameters"] = params
    plugins = [
        handler,
        *({"type": f"{s}-filter"} for s in stages),
        {"type": "max-score-picker"},
    ]
    profiles = [
        {"name": s, "plugins": [{"pluginRef": f"{s}-filter"}, {"pluginRef": "max-score-picker"}]}
        for s in stages
    ]
    return config(plugins, profiles)


def fleet() -> list[Endpoint]:
    """Two pods of each role; a pod's role is in its name."""
    roles = ["encode", "encode", "prefill", "prefill", "decode", "decode"]
    return [Endpoint(f"{r}-{i}", f"10.0.0.{i}", 8000, {ROLE: r}) for i, r in enumerate(roles)]


def req(headers: dict[str, str] | None = None, rid: str = "r") -> SchedulingRequest:
    return SchedulingRequest(rid, "m", token_ids=list(range(32)), headers=headers or {})


def params_of(data: dict[str, Any], registry: PluginRegistry) -> dict[str, Any]:
    out: dict[str, Any] = load_config(data, registry).plugins["header-profile-handler"].parameters()
    return out


# -- parameters ------------------------------------------------------------------------------------


def test_defaults_are_epp_profile_and_decode(registry: PluginRegistry) -> None:
    """Without parameters the header is EPP-Profile (stored lower-cased) and the default decode."""
    assert params_of(stage_config(), registry) == {
        "headerName": "epp-profile",
        "defaultProfile": "decode",
    }


@pytest.mark.parametrize(
    ("params", "header", "default"),
    [
        ({"headerName": "x-profile"}, "x-profile", "decode"),
        ({"headerName": "  X-Custom-Profile  "}, "x-custom-profile", "decode"),
        ({"headerName": "   "}, "epp-profile", "decode"),
        ({"headerName": ""}, "epp-profile", "decode"),
        ({"defaultProfile": "prefill"}, "epp-profile", "prefill"),
        ({"defaultProfile": "  prefill "}, "epp-profile", "prefill"),
        ({"defaultProfile": "   "}, "epp-profile", "decode"),
    ],
)
def test_parameters_are_trimmed_and_defaulted(
    params: dict[str, Any], header: str, default: str, registry: PluginRegistry
) -> None:
    """headerName is trimmed and lower-cased, defaultProfile trimmed; blank means the default."""
    assert params_of(stage_config(params), registry) == {
        "headerName": header,
        "defaultProfile": default,
    }


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"headerName": 5}, "headerName"),
        ({"defaultProfile": ["decode"]}, "defaultProfile"),
        ({"defaultProfile": None}, "defaultProfile"),
        ({"headerNme": "x"}, "headerNme"),
    ],
)
def test_bad_parameters_fail_with_their_path(
    params: dict[str, Any], key: str, registry: PluginRegistry
) -> None:
    """A non-string value or an unknown key is refused with its YAML path."""
    with pytest.raises(ConfigError) as info:
        load_config(stage_config(params), registry)
    assert info.value.path == f"plugins[0].parameters.{key}"


# -- which profile runs ------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["encode", "prefill", "decode"])
def test_header_names_the_one_profile_that_runs(stage: str) -> None:
    """The profile named by EPP-Profile runs alone, is primary, and picks a pod of its role."""
    s = build(stage_config(), seed=0)
    r = s.schedule(req({"epp-profile": stage}), fleet())
    assert r.profile == stage and set(r.profile_results) == {stage}
    assert r.target.labels[ROLE] == stage
    assert r.headers == {}


def test_value_is_trimmed_before_matching() -> None:
    """Incidental whitespace around the header value still selects the profile."""
    s = build(stage_config(), seed=0)
    assert s.schedule(req({"epp-profile": "  encode\t"}), fleet()).profile == "encode"


@pytest.mark.parametrize("headers", [{}, {"epp-profile": ""}, {"epp-profile": "   "}])
def test_missing_or_blank_header_runs_the_default_profile(headers: dict[str, str]) -> None:
    """No header (e.g. GET /models) or a blank one runs defaultProfile (decode)."""
    s = build(stage_config(), seed=0)
    r = s.schedule(req(headers), fleet())
    assert r.profile == "decode" and set(r.profile_results) == {"decode"}


def test_custom_default_profile_is_a_fallback_only() -> None:
    """A custom defaultProfile runs without the header; an explicit header still wins."""
    s = build(stage_config({"defaultProfile": "prefill"}), seed=0)
    assert s.schedule(req(), fleet()).profile == "prefill"
    assert s.schedule(req({"epp-profile": "encode"}), fleet()).profile == "encode"


def test_custom_header_name_is_matched_case_insensitively() -> None:
    """A mixed-case headerName reads the lower-cased key the front doors store, and a mixed-case
    key given by a library caller; the old header is then ignored."""
    s = build(stage_config({"headerName": "X-Stage"}), seed=0)
    assert s.schedule(req({"x-stage": "encode"}), fleet()).profile == "encode"
    assert s.schedule(req({"X-Stage": "prefill"}), fleet()).profile == "prefill"
    assert s.schedule(req({"epp-profile": "encode"}), fleet()).profile == "decode"


def test_single_profile_runs_whatever_the_header_says() -> None:
    """With one profile configured it runs with no header and with an unknown value."""
    s = build(stage_config(stages=("decode",)), seed=0)
    assert s.schedule(req(), fleet()).profile == "decode"
    assert s.schedule(req({"epp-profile": "prefill"}), fleet()).profile == "decode"


# -- no matching profile -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["prefil", "Encode", "DECODE"])
def test_unknown_value_is_rejected_with_429_naming_it(value: str) -> None:
    """A value naming no profile (matching is case-sensitive) runs nothing: a 429 rejection
    whose message names the header and the value."""
    s = build(stage_config(), seed=0)
    with pytest.raises(RequestRejectedError) as info:
        s.schedule(req({"epp-profile": value}), fleet())
    assert info.value.status == 429
    assert f"no scheduling profile configured for 'epp-profile' header value '{value}'" in str(
        info.value
    )


def test_missing_header_without_configured_default_is_rejected() -> None:
    """No header while defaultProfile (decode) is not configured: the reason is the missing
    header and the unconfigured default, not a made-up value."""
    s = build(stage_config(stages=("encode", "prefill")), seed=0)
    with pytest.raises(RequestRejectedError) as info:
        s.schedule(req(), fleet())
    assert info.value.status == 429
    msg = str(info.value)
    assert "missing 'epp-profile' header" in msg
    assert "defaultProfile 'decode' is not a configured scheduling profile" in msg


def test_huge_value_gives_a_bounded_message() -> None:
    """A megabyte of header value is rejected with a message quoting a bounded prefix."""
    s = build(stage_config(), seed=0)
    value = "x" * 1_000_000
    with pytest.raises(RequestRejectedError) as info:
        s.schedule(req({"epp-profile": value}), fleet())
    msg = str(info.value)
    assert len(msg) < 200 + MAX_SHOWN_VALUE
    assert "1000000 characters" in msg


@pytest.mark.parametrize("value", ["décode", "decode\x00", "\u202edecode", "プリフィル", "\ud800"])
def test_non_ascii_and_control_values_are_rejected_in_plain_ascii(value: str) -> None:
    """Non-ASCII, control and unpaired-surrogate values are rejected cleanly, quoted escaped."""
    s = build(stage_config(), seed=0)
    with pytest.raises(RequestRejectedError) as info:
        s.schedule(req({"epp-profile": value}), fleet())
    msg = str(info.value)
    assert msg.isascii() and msg.isprintable()


def test_selected_profile_finding_no_endpoint_fails_with_its_reason() -> None:
    """When the named profile's filter leaves nothing, its own error comes back (not a 429)."""
    s = build(stage_config(), seed=0)
    decode_only = [e for e in fleet() if e.labels[ROLE] == "decode"]
    with pytest.raises(NoEndpointError, match="prefill-filter") as info:
        s.schedule(req({"epp-profile": "prefill"}), decode_only)
    assert not isinstance(info.value, RequestRejectedError)


def test_process_results_needs_exactly_one_result() -> None:
    """Results of two profiles are refused; one result is primary."""
    handler = HeaderProfileHandler(
        HeaderProfileHandlerParams(), PluginContext("h", "header-profile-handler")
    )
    ctx = SchedulingContext(0.0)

    def result(name: str) -> ProfileResult:
        return ProfileResult(name, [], [], {}, {}, {})

    assert handler.process_results(ctx, req(), {"encode": result("encode")}) == "encode"
    two = {"encode": result("encode"), "decode": result("decode")}
    with pytest.raises(NoEndpointError, match="2 ran"):
        handler.process_results(ctx, req(), two)


# -- the upstream configuration ----------------------------------------------------------------------


def test_upstream_coordinator_config_selects_by_header() -> None:
    """The coordinator e2e eppConfig: each EPP-Profile value picks a pod of its role, no header
    picks a decode pod (through its label-selector-filter)."""
    s = build(yaml.safe_load(CORPUS.read_text()), seed=0)
    try:
        for stage in ("encode", "prefill", "decode"):
            r = s.schedule(req({"epp-profile": stage}), fleet())
            assert (r.profile, r.target.labels[ROLE]) == (stage, stage)
        r = s.schedule(req(), fleet())
        assert (r.profile, r.target.labels[ROLE]) == ("decode", "decode")
        with pytest.raises(RequestRejectedError):
            s.schedule(req({"epp-profile": "embed"}), fleet())
    finally:
        s.close()
