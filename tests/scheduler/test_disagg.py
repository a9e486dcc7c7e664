"""P/D and E/P/D disaggregation: profile handlers, deciders, role filters and the sidecar headers
(ported in spirit from upstream's disagg handler, decider and header-handler test tables)."""

from __future__ import annotations

from typing import Any

import pytest

from kvaware_scorer.errors import ConfigError, NoEndpointError
from kvaware_scorer.scheduler import Endpoint, PluginRegistry, SchedulingRequest, load_config

from .conftest import build, config

ROLE = "llm-d.ai/role"


def fleet(decode: int = 2, prefill: int = 2, encode: int = 0) -> list[Endpoint]:
    """Endpoints labeled by role: decode pods first, then prefill, then encode."""
    out: list[Endpoint] = []
    for role, n in (("decode", decode), ("prefill", prefill), ("encode", encode)):
        for _ in range(n):
            i = len(out)
            out.append(Endpoint(f"{role}-{i}", f"10.0.0.{i}", 8000, {ROLE: role}))
    return out


def pd_config(
    handler: dict[str, Any] | None = None, *extra: dict[str, Any], encode: bool = False
) -> dict[str, Any]:
    """decode / prefill (/ encode) profiles with an approximate prefix producer."""
    plugins = [
        handler or {"type": "disagg-profile-handler"},
        {"type": "decode-filter"},
        {"type": "prefill-filter"},
        {"type": "approx-prefix-cache-producer", "parameters": {"blockSizeTokens": 16}},
        {"type": "prefix-cache-scorer"},
        {"type": "max-score-picker"},
        *extra,
    ]
    profiles = [
        {
            "name": "decode",
            "plugins": [
                {"pluginRef": "decode-filter"},
                {"pluginRef": "prefix-cache-scorer"},
                {"pluginRef": "max-score-picker"},
            ],
        },
        {
            "name": "prefill",
            "plugins": [
                {"pluginRef": "prefill-filter"},
                {"pluginRef": "prefix-cache-scorer"},
                {"pluginRef": "max-score-picker"},
            ],
        },
    ]
    if encode:
        plugins += [
            {"type": "encode-filter"},
            {"type": "max-score-picker", "name": "two", "parameters": {"maxNumOfEndpoints": 2}},
        ]
        profiles.append(
            {"name": "encode", "plugins": [{"pluginRef": "encode-filter"}, {"pluginRef": "two"}]}
        )
    return config(plugins, profiles)


def always_pd() -> dict[str, Any]:
    return pd_config(
        {
            "type": "disagg-profile-handler",
            "parameters": {"deciders": {"prefill": "always-disagg-pd-decider"}},
        },
        {"type": "always-disagg-pd-decider"},
    )


def req(rid: str, n: int = 64, **kw: Any) -> SchedulingRequest:
    return SchedulingRequest(rid, "m", token_ids=list(range(n)), **kw)


def test_decode_and_prefill_picks_with_the_sidecar_header() -> None:
    """Both picks come back, decode is primary, and x-prefiller-host-port names the prefill pod."""
    s = build(always_pd(), seed=0)
    eps = fleet()
    r = s.schedule(req("a"), eps)
    assert r.profile == "decode" and r.target.labels[ROLE] == "decode"
    prefill = r.profile_target("prefill")
    assert prefill is not None and prefill.labels[ROLE] == "prefill"
    assert r.headers == {"x-prefiller-host-port": f"{prefill.address}:{prefill.port}"}
    assert set(r.profile_results) == {"decode", "prefill"}


def test_no_prefill_pods_means_decode_only() -> None:
    """A prefill profile that finds no endpoint leaves a decode-only result without header."""
    s = build(always_pd(), seed=0)
    r = s.schedule(req("a"), fleet(prefill=0))
    assert r.profile == "decode" and set(r.profile_results) == {"decode"}
    assert "prefill" in r.failed_profiles and r.headers == {}


def test_no_decode_pods_fails() -> None:
    """Without a decode endpoint the request fails (upstream: no decode workers)."""
    s = build(always_pd(), seed=0)
    with pytest.raises(NoEndpointError):
        s.schedule(req("a"), fleet(decode=0))


def test_no_decider_is_decode_only() -> None:
    """Without deciders.prefill the prefill profile never runs (a static decision)."""
    s = build(pd_config(), seed=0)
    r = s.schedule(req("a"), fleet())
    assert set(r.profile_results) == {"decode"} and r.headers == {}


@pytest.mark.parametrize(
    ("params", "prompt", "expect"),
    [
        ({"nonCachedTokens": 0}, 256, False),  # disabled
        ({"nonCachedTokens": 32}, 256, True),  # enough uncached tokens
        ({"nonCachedTokens": 512}, 256, False),  # prompt shorter than the threshold
        ({"nonCachedTokens": 32, "promptTokens": 300}, 256, False),  # prompt below promptTokens
    ],
)
def test_prefix_based_decider_table(params: dict[str, int], prompt: int, expect: bool) -> None:
    """prefix-based-pd-decider: nonCachedTokens and promptTokens on a cold decode pick."""
    cfg = pd_config(
        {
            "type": "disagg-profile-handler",
            "parameters": {"deciders": {"prefill": "prefix-based-pd-decider"}},
        },
        {"type": "prefix-based-pd-decider", "parameters": params},
    )
    r = build(cfg, seed=0).schedule(req("a", prompt), fleet())
    assert ("prefill" in r.profile_results) is expect


def test_prefix_based_decider_second_request_hits_the_cache() -> None:
    """The same prompt twice: the first disaggregates, the second finds its prefix on the
    decode pick (recorded by the producer) and stays decode-only."""
    cfg = pd_config(
        {
            "type": "disagg-profile-handler",
            "parameters": {"deciders": {"prefill": "prefix-based-pd-decider"}},
        },
        {"type": "prefix-based-pd-decider", "parameters": {"nonCachedTokens": 64}},
    )
    s = build(cfg, seed=0)
    eps = fleet()
    first = s.schedule(req("a", 256), eps)
    assert "prefill" in first.profile_results
    second = s.schedule(req("b", 256), eps)
    assert second.target is first.target and "prefill" not in second.profile_results
    longer = s.schedule(req("c", 256 + 128), eps)
    assert "prefill" in longer.profile_results  # 128 new tokens >= 64


def image_request(rid: str) -> SchedulingRequest:
    content = [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "x"}},
    ]
    return SchedulingRequest(rid, "m", messages=[{"role": "user", "content": content}])


def test_encode_stage_for_multimodal_requests() -> None:
    """E/P/D: media requests get an encode stage whose picks are listed in x-encoder-hosts-ports."""
    cfg = pd_config(
        {
            "type": "disagg-profile-handler",
            "parameters": {"deciders": {"encode": "always-disagg-multimodal-decider"}},
        },
        {"type": "always-disagg-multimodal-decider"},
        encode=True,
    )
    s = build(cfg, seed=0)
    eps = fleet(encode=2)
    r = s.schedule(image_request("a"), eps)
    encoders = sorted(h for h in r.headers["x-encoder-hosts-ports"].split(","))
    assert encoders == sorted(f"{e.address}:8000" for e in eps if e.labels[ROLE] == "encode")
    text = s.schedule(req("b"), eps)
    assert "encode" not in text.profile_results and text.headers == {}


def test_prefill_first_order() -> None:
    """stageOrder prefill-first runs prefill, then decode; decode stays primary."""
    cfg = pd_config(
        {"type": "disagg-profile-handler", "parameters": {"stageOrder": "PrefillFirst"}}
    )
    s = build(cfg, seed=0)
    r = s.schedule(req("a"), fleet())
    assert list(r.profile_results) == ["prefill", "decode"] and r.profile == "decode"
    assert "x-prefiller-host-port" in r.headers


def test_prefill_first_refuses_a_prefill_decider(registry: PluginRegistry) -> None:
    """A prefill decider makes no sense when prefill always runs first."""
    params = {"stageOrder": "prefill-first", "deciders": {"prefill": "always-disagg-pd-decider"}}
    cfg = pd_config(
        {"type": "disagg-profile-handler", "parameters": params},
        {"type": "always-disagg-pd-decider"},
    )
    with pytest.raises(ConfigError) as info:
        load_config(cfg, registry)
    assert info.value.path == "plugins[0].parameters"


def test_legacy_flat_parameters_load_with_warnings(registry: PluginRegistry) -> None:
    """The deprecated flat form (prefillDeciderPluginName, decodeProfile...) maps to the nested one."""
    params = {"decodeProfile": "decode", "prefillDeciderPluginName": "always-disagg-pd-decider"}
    cfg = load_config(
        pd_config(
            {"type": "disagg-profile-handler", "parameters": params},
            {"type": "always-disagg-pd-decider"},
        ),
        registry,
    )
    assert cfg.plugins["disagg-profile-handler"].parameters()["deciders"]["prefill"] == (
        "always-disagg-pd-decider"
    )
    assert any("prefillDeciderPluginName" in w and "deprecated" in w for w in cfg.warnings)
    mixed = {"decodeProfile": "decode", "profiles": {"decode": "decode"}}
    with pytest.raises(ConfigError, match="one format"):
        load_config(pd_config({"type": "disagg-profile-handler", "parameters": mixed}), registry)


@pytest.mark.parametrize("ref", ["missing", "decode-filter"])
def test_decider_reference_checked(ref: str, registry: PluginRegistry) -> None:
    """deciders.prefill must name a configured decider (path names the parameter)."""
    cfg = pd_config(
        {"type": "disagg-profile-handler", "parameters": {"deciders": {"prefill": ref}}}
    )
    with pytest.raises(ConfigError) as info:
        load_config(cfg, registry)
    assert info.value.path == "plugins[0].parameters.deciders.prefill"


def test_older_pd_profile_handler_with_prefill_header_handler() -> None:
    """llm-d's older form: pd-profile-handler + prefill-header-handler gives the same picks and
    header (and primaryPort adds x-data-parallel-host-port)."""
    cfg = pd_config(
        {
            "type": "pd-profile-handler",
            "parameters": {"deciderPluginName": "always-disagg-pd-decider", "primaryPort": 8000},
        },
        {"type": "always-disagg-pd-decider"},
        {"type": "prefill-header-handler"},
    )
    s = build(cfg, seed=0)
    r = s.schedule(req("a"), fleet())
    prefill = r.profile_target("prefill")
    assert prefill is not None
    assert r.headers["x-prefiller-host-port"] == f"{prefill.address}:8000"
    assert r.headers["x-data-parallel-host-port"] == f"{r.target.address}:8000"
    assert any("deprecated" in w for w in s.config.warnings)


@pytest.mark.parametrize(
    ("filter_type", "kept"),
    [
        (
            "prefill-filter",
            {"prefill", "encode-prefill", "prefill-decode", "both", "encode-prefill-decode"},
        ),
        ("encode-filter", {"encode", "encode-prefill", "encode-prefill-decode"}),
        ("decode-filter", {"decode", "prefill-decode", "both", "encode-prefill-decode", None}),
    ],
)
def test_role_filters(filter_type: str, kept: set[str | None]) -> None:
    """Role filters keep the roles that can do their stage; only decode keeps unlabeled pods."""
    roles = [
        "decode",
        "prefill",
        "encode",
        "encode-prefill",
        "prefill-decode",
        "both",
        "encode-prefill-decode",
        None,
    ]
    eps = [
        Endpoint(f"p{i}", f"10.0.1.{i}", 8000, {ROLE: r} if r else {}) for i, r in enumerate(roles)
    ]
    s = build(config([{"type": filter_type}]), seed=0)
    flt = s.plugin(filter_type)
    out = flt.filter(s.context(), req("a"), eps)
    assert {e.labels.get(ROLE) for e in out} == kept


@pytest.mark.parametrize(
    ("params", "expect"),
    [({}, True), ({"threshold": 10, "hashBlockSize": 5}, True), ({"threshold": 100000}, False)],
)
def test_pd_profile_handler_older_built_in_rule(params: dict[str, Any], expect: bool) -> None:
    """Older pd-profile-handler configs (no decider; threshold / hashBlockSize) load: threshold 0
    always disaggregates, a threshold beyond the prompt never does."""
    cfg = pd_config(
        {"type": "pd-profile-handler", "parameters": params}, {"type": "prefill-header-handler"}
    )
    r = build(cfg, seed=0).schedule(req("a", 256), fleet())
    assert ("x-prefiller-host-port" in r.headers) is expect
