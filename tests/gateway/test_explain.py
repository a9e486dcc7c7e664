"""`explain` (the ``/v1/score`` engine) against the scheduler's own pipeline (no sockets)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from kvaware_scorer.errors import NoEndpointError
from kvaware_scorer.gateway import explain
from kvaware_scorer.scheduler import (
    Endpoint,
    EndpointMetrics,
    ResponseInfo,
    Scheduler,
    SchedulingRequest,
    make_plugin_manager,
)

from .conftest import ROOT

MODEL = "m"


def fleet() -> list[Endpoint]:
    """Four endpoints with distinct load (no ties)."""
    now = time.monotonic()
    out = []
    for i in range(4):
        e = Endpoint(f"pod-{i}", f"10.0.0.{i}", 8000)
        e.metrics = EndpointMetrics(
            waiting_queue_size=(i * 3) % 4,
            running_requests_size=i,
            kv_cache_usage_percent=0.1 + 0.2 * ((i + 1) % 4),
            update_time=now,
        )
        out.append(e)
    return out


def explained(sched: Scheduler, req: SchedulingRequest, eps: list[Endpoint]) -> dict[str, Any]:
    """The explanation of a dry-run decision, as ``POST /v1/score`` builds it."""
    return explain(sched.schedule(req, eps, dry_run=True), eps)


def scheduler(name: str) -> Scheduler:
    return Scheduler.from_yaml(
        ROOT / "config" / name, plugin_manager=make_plugin_manager(use_env=False), seed=1
    )


@pytest.mark.parametrize("config", ["precise.yaml", "load.yaml", "estimated.yaml"])
def test_explain_matches_schedule(config: str) -> None:
    """The explanation has exactly the scores, totals and pick `Scheduler.schedule` produces,
    and leaves no trace (in-flight counts, speculative entries) while schedule does."""
    sched = scheduler(config)
    eps = fleet()
    sched.set_endpoints(eps)
    holder = eps[2]
    if "precise-prefix-cache-scorer" in sched.plugins:
        precise = sched.plugin("precise-prefix-cache-scorer")
        precise.indexer.index.add(holder.id, precise.indexer.block_keys(list(range(64)), MODEL))
    for i in range(3):
        req = SchedulingRequest(f"r{i}", MODEL, token_ids=list(range(64)) + [i] * 16)
        out = explained(sched, req, eps)
        if "active-request-scorer" in sched.plugins:
            assert all(sched.plugin("active-request-scorer").count(e.id) == 0 for e in eps)
        sreq = SchedulingRequest(f"s{i}", MODEL, token_ids=req.token_ids)
        real = sched.schedule(sreq, eps)
        assert out["scores"] == real.scores
        assert out["totals"] == pytest.approx(real.totals)
        assert out["weights"] == real.weights
        assert out["pick"]["endpoint"] == real.targets[0].id
        assert out["ranking"][0]["endpoint"] == real.targets[0].id
        assert out["errors"] == {}
        sched.post_response(sreq, real, ResponseInfo())
    sched.close()


def test_explain_names_the_emptying_filter() -> None:
    """A filter that leaves no endpoint is named in the error, as in routing."""
    sched = scheduler("precise.yaml")
    eps = [Endpoint("p", "10.0.0.9", 8000, {"llm-d.ai/role": "prefill"})]
    with pytest.raises(NoEndpointError, match="decode-filter"):
        explained(sched, SchedulingRequest("r", MODEL, token_ids=[1] * 32), eps)
    with pytest.raises(NoEndpointError):
        explained(sched, SchedulingRequest("r", MODEL, token_ids=[1] * 32), [])
    sched.close()


def test_explain_reports_scorer_errors() -> None:
    """A scorer that fails scores 0 in the explanation and its error is reported."""
    sched = scheduler("precise.yaml")
    eps = fleet()
    # On this text prompt the precise scorer cannot tokenize (no tokenizer for "m").
    req = SchedulingRequest("r", MODEL, prompt="hello")
    out = explained(sched, req, eps)
    assert all(v == 0.0 for v in out["scores"]["precise-prefix-cache-scorer"].values())
    assert set(out["totals"]) == {e.id for e in eps}
    sched.close()
