"""``data-parallel-profile-handler``: one profile, the rank pick sent to ``primaryPort`` with
``x-data-parallel-host-port`` naming the rank (ported in spirit from upstream's factory, Pick
and ProcessResults test tables)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kvaware_scorer.errors import ConfigError, NoEndpointError
from kvaware_scorer.scheduler import Endpoint, PluginRegistry, SchedulingRequest, load_config

from .conftest import build, config

HEADER = "x-data-parallel-host-port"
CORPUS = Path(__file__).parent / "upstream_corpus" / "dp-profile-handler.yaml"


def dp_config(
    params: dict[str, Any] | None = None, *before: dict[str, Any], picks: int = 1
) -> dict[str, Any]:
    """One ``default`` profile (a picker of `picks` endpoints), `before` listed first."""
    handler: dict[str, Any] = {"type": "data-parallel-profile-handler"}
    if params is not None:
        handler["parameters"] = params
    plugins = [
        *before,
        {"type": "max-score-picker", "parameters": {"maxNumOfEndpoints": picks}},
        handler,
    ]
    refs = [{"pluginRef": p.get("name", p["type"])} for p in before if "scorer" in p["type"]]
    profiles = [{"name": "default", "plugins": [*refs, {"pluginRef": "max-score-picker"}]}]
    return config(plugins, profiles)


def ranks(address: str = "10.0.0.7", n: int = 4, first: int = 8000) -> list[Endpoint]:
    """The data-parallel ranks of one pod: ``<pod>-rank-<i>`` at ``address:first+i``."""
    return [Endpoint(f"pod-rank-{i}", address, first + i) for i in range(n)]


def req(rid: str = "r") -> SchedulingRequest:
    return SchedulingRequest(rid, "m", token_ids=list(range(64)))


def params_of(data: dict[str, Any], registry: PluginRegistry) -> dict[str, Any]:
    cfg = load_config(data, registry)
    out: dict[str, Any] = cfg.plugins["data-parallel-profile-handler"].parameters()
    return out


def test_primary_port_defaults_to_8000(registry: PluginRegistry) -> None:
    """Without parameters, primaryPort is upstream's default 8000."""
    assert params_of(dp_config(), registry) == {"primaryPort": 8000}


@pytest.mark.parametrize("port", [0, 1, 9000, 65535])
def test_valid_primary_ports_are_accepted(port: int, registry: PluginRegistry) -> None:
    """1..65535 and 0 (accepted upstream) load as given."""
    assert params_of(dp_config({"primaryPort": port}), registry) == {"primaryPort": port}


@pytest.mark.parametrize("port", [-1, 65536, 100000])
def test_out_of_range_primary_port_fails_with_its_path(port: int, registry: PluginRegistry) -> None:
    """A port outside 1..65535 (other than 0) is refused with upstream's message and the path."""
    with pytest.raises(ConfigError) as info:
        load_config(dp_config({"primaryPort": port}), registry)
    assert info.value.path == "plugins[1].parameters.primaryPort"
    assert f"invalid primaryPort: must be between 1 and 65535, got {port}" in str(info.value)


@pytest.mark.parametrize("value", ["8000", True, 8000.5, None])
def test_non_integer_primary_port_fails_with_its_path(
    value: object, registry: PluginRegistry
) -> None:
    """A string, boolean, float or null primaryPort is refused, as upstream's decoding does."""
    with pytest.raises(ConfigError) as info:
        load_config(dp_config({"primaryPort": value}), registry)
    assert info.value.path == "plugins[1].parameters.primaryPort"


def test_unknown_parameter_fails_naming_the_valid_one(registry: PluginRegistry) -> None:
    """A misspelt parameter is refused with its path and the valid name."""
    with pytest.raises(ConfigError) as info:
        load_config(dp_config({"primaryPrt": 8000}), registry)
    assert info.value.path == "plugins[1].parameters.primaryPrt"
    assert "primaryPort" in str(info.value)


def test_deprecation_is_warned(registry: PluginRegistry) -> None:
    """Loading the handler warns that upstream deprecated it for single-profile-handler."""
    cfg = load_config(dp_config(), registry)
    assert any("deprecated" in w and "single-profile-handler" in w for w in cfg.warnings)


def test_rank_pick_is_sent_to_the_primary_port_with_the_rank_in_the_header() -> None:
    """The pick keeps its address, goes to primaryPort, and the header names its own port."""
    s = build(dp_config({"primaryPort": 9000}), seed=0)
    pool = ranks()
    chosen = pool[2]
    r = s.schedule(req(), [chosen])
    assert (r.target.address, r.target.port, r.target.name) == ("10.0.0.7", 9000, "pod-rank-2")
    assert r.headers == {HEADER: "10.0.0.7:8002"}
    assert r.profile == "default"
    assert [e.port for e in r.profile_results["default"].targets] == [9000]
    assert chosen.port == 8002 and chosen.id == "10.0.0.7:8002", "the pool's endpoint is untouched"


def test_every_target_is_rewritten_and_the_header_names_the_first() -> None:
    """With several picks all go to primaryPort; the header names the first pick's rank."""
    s = build(dp_config({"primaryPort": 8080}, picks=2), seed=0)
    r = s.schedule(req(), ranks(n=3, first=8001))
    assert len(r.targets) == 2
    assert {e.port for e in r.targets} == {8080}
    first = r.profile_results["default"].candidates
    assert r.headers[HEADER] in first
    assert r.headers[HEADER] != r.target.id


def test_ipv6_rank_is_bracketed_in_the_header() -> None:
    """An IPv6 pick is written ``[addr]:port`` in the header, as Go's JoinHostPort does."""
    s = build(dp_config(), seed=0)
    r = s.schedule(req(), [Endpoint("v6-rank-1", "fd00::7", 8001)])
    assert r.headers == {HEADER: "[fd00::7]:8001"}
    assert r.target.port == 8000


def test_primary_port_zero_keeps_the_rank_port() -> None:
    """primaryPort 0 sets the header only: the request keeps the rank's own port."""
    s = build(dp_config({"primaryPort": 0}), seed=0)
    r = s.schedule(req(), [Endpoint("pod-rank-1", "10.0.0.7", 8001)])
    assert r.target.id == "10.0.0.7:8001"
    assert r.headers == {HEADER: "10.0.0.7:8001"}


def test_pick_already_on_the_primary_port_is_kept() -> None:
    """A pick already at primaryPort is the pool's own endpoint, still named in the header."""
    s = build(dp_config(), seed=0)
    pool = ranks(n=1)
    r = s.schedule(req(), pool)
    assert r.target is pool[0]
    assert r.headers == {HEADER: "10.0.0.7:8000"}


def test_dry_run_shows_the_rank_without_header() -> None:
    """An explained decision runs no pre-request hook: the rank pick, no header."""
    s = build(dp_config(), seed=0)
    r = s.schedule(req(), [Endpoint("pod-rank-3", "10.0.0.7", 8003)], dry_run=True)
    assert r.target.port == 8003 and r.headers == {}


def test_in_flight_accounting_stays_on_the_rank() -> None:
    """A load scorer listed before the handler counts the request against the rank, not the
    primary port (which is another rank's id), and no ordering warning is given."""
    s = build(dp_config(None, {"type": "active-request-scorer"}), seed=0)
    assert not any("pre-request hooks listed after" in w for w in s.config.warnings)
    pool = ranks()
    r = s.schedule(req(), [pool[3]])
    assert r.target.port == 8000
    scorer = s.plugin("active-request-scorer")
    assert scorer.count("10.0.0.7:8003") == 1
    assert scorer.count("10.0.0.7:8000") == 0


def test_pre_request_plugins_listed_after_the_handler_are_warned_about() -> None:
    """A plugin whose pre-request hook runs after the rewrite is named in a warning."""
    data = dp_config()
    data["plugins"].append({"type": "active-request-scorer"})
    data["schedulingProfiles"][0]["plugins"].insert(0, {"pluginRef": "active-request-scorer"})
    s = build(data, seed=0)
    assert any(
        "active-request-scorer" in w and "pre-request hooks listed after" in w
        for w in s.config.warnings
    )


def test_more_than_one_profile_fails_clearly() -> None:
    """Two configured profiles: no profile runs and the error says one is required."""
    data = dp_config()
    data["schedulingProfiles"].append(
        {"name": "other", "plugins": [{"pluginRef": "max-score-picker"}]}
    )
    s = build(data, seed=0)
    with pytest.raises(NoEndpointError, match="exactly one scheduling profile, 2 configured"):
        s.schedule(req(), ranks())


def test_profile_finding_no_endpoint_fails_with_its_reason() -> None:
    """When the profile's filter leaves nothing, its own error is raised and no header set."""
    data = dp_config(None, {"type": "decode-filter"})
    data["schedulingProfiles"][0]["plugins"].insert(0, {"pluginRef": "decode-filter"})
    s = build(data, seed=0)
    prefill_only = [Endpoint("p-rank-0", "10.0.0.9", 8001, {"llm-d.ai/role": "prefill"})]
    with pytest.raises(NoEndpointError, match="decode-filter"):
        s.schedule(req(), prefill_only)


def test_upstream_dp_config_routes_ranks_through_the_primary_port() -> None:
    """deploy/config/dp-epp-config.yaml: decode ranks of two pods, the pick goes to port 8000
    of its pod and the header names the rank."""
    s = build(yaml.safe_load(CORPUS.read_text()), seed=0)
    try:
        pool = ranks("10.0.0.1", 2, 8200) + ranks("10.0.0.2", 2, 8200)
        by_id = {e.id: e for e in pool}
        for i in range(8):
            r = s.schedule(req(f"r{i}"), pool)
            rank = by_id[r.headers[HEADER]]
            assert r.target.address == rank.address and r.target.port == 8000
            assert r.target.name == rank.name
    finally:
        s.close()
