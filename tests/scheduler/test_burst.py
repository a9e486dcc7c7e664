"""burst-prefix-cache-producer: a window of concurrent requests is assigned jointly (ported in
spirit from upstream's assign and plugin tests)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler import Scheduler, SchedulingRequest

from .conftest import build, config, endpoints


def burst_scheduler(**params: Any) -> Scheduler:
    plugins = [
        {"type": "burst-prefix-cache-producer", "parameters": {"windowDurationMs": 200, **params}},
        {
            "type": "prefix-cache-scorer",
            "parameters": {"prefixMatchInfoProducerName": "burst-prefix-cache-producer"},
        },
    ]
    return build(config(plugins), seed=0)


def run_window(s: Scheduler, prompts: list[list[int]], n_eps: int = 4) -> list[str]:
    """Schedule the prompts concurrently (one window); returns each request's target id."""
    eps = endpoints(n_eps)
    out: list[str] = [""] * len(prompts)

    def one(i: int) -> None:
        out[i] = s.schedule(SchedulingRequest(f"r{i}", "m", token_ids=prompts[i]), eps).target.id

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def test_identical_prompts_go_to_one_replica() -> None:
    """The n samples of one prompt land on one replica; a second group goes elsewhere."""
    a, b = list(range(256)), list(range(1000, 1256))
    targets = run_window(burst_scheduler(), [a, a, a, b, b, b])
    assert len(set(targets[:3])) == 1 and len(set(targets[3:])) == 1
    assert targets[0] != targets[3]


def test_max_per_replica_splits_a_group() -> None:
    """maxPerReplica 2 spreads a group of 4 over two replicas, 2 each."""
    a = list(range(256))
    targets = run_window(burst_scheduler(maxPerReplica=2), [a] * 4)
    assert sorted(targets.count(t) for t in set(targets)) == [2, 2]


def test_shared_leading_blocks_colocate_with_min_colocate_blocks() -> None:
    """Distinct prompts sharing 3 leading blocks are co-located (bounded by the fair share):
    two families of two over two replicas keep each family together."""
    x, y = list(range(192)), list(range(5000, 5192))
    prompts = [x + [1] * 64, x + [2] * 64, y + [3] * 64, y + [4] * 64]
    targets = run_window(
        burst_scheduler(minColocateBlocks=3, windowDurationMs=300), prompts, n_eps=2
    )
    assert targets[0] == targets[1] and targets[2] == targets[3] and targets[0] != targets[2]


def test_a_lone_request_gets_no_affinity() -> None:
    """A request alone in its window scores 0 everywhere (no affinity)."""
    s = burst_scheduler(windowDurationMs=1)
    eps = endpoints(3)
    r = s.schedule(SchedulingRequest("a", "m", token_ids=list(range(256))), eps)
    assert set(r.scores["prefix-cache-scorer"].values()) == {0.0}


@pytest.mark.parametrize(
    "params", [{"windowDurationMs": 0}, {"maxPerReplica": 0}, {"maxPrefixTokensToMatch": 10}]
)
def test_invalid_parameters(params: dict[str, Any]) -> None:
    """Upstream's parameter limits are enforced."""
    with pytest.raises(ConfigError):
        burst_scheduler(**params)
