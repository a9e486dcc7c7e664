"""End-to-end harness: live emulated pods, a real gateway with the precise config, real sockets.

Everything listens on 127.0.0.1 on free ports; the pods and the gateway run on the test's event
loop, the KV-event subscriber on its own thread, exactly as in `kvaware serve`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from kvaware_scorer.gateway import Gateway, GatewayConfig
from kvaware_scorer.scheduler import Scheduler
from kvaware_scorer.sim.live import LiveFleet, LivePod, LivePodsConfig
from kvaware_scorer.tokenization import TokenizationService, install_local_tokenizer
from kvaware_scorer.tokenization.local import builtin_corpus
from kvaware_scorer.tours.demo import scheduler_config
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
MODEL = "kvaware/e2e-model"
PRECISE = "precise-prefix-cache-scorer"


@pytest.fixture(scope="session")
def tokenizer_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A discovery root holding the offline tokenizer of `MODEL` (pods and gateway share it)."""
    root = tmp_path_factory.mktemp("tokenizers")
    install_local_tokenizer(root, MODEL)
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer_root: Path) -> Path:
    """The tokenizer directory of `MODEL`."""
    return tokenizer_root.joinpath(*MODEL.split("/"))


@pytest.fixture(scope="session")
def tokenization(tokenizer_dir: Path) -> Any:
    """A full (prefix-store-free) tokenization service for `MODEL`, to compute expectations."""
    from kvaware_scorer.config import (
        LocalTokenizerConfig,
        PrefixStoreConfig,
        TokenizersPoolConfig,
    )

    service = TokenizationService(
        TokenizersPoolConfig(
            local=LocalTokenizerConfig(model_tokenizer_map={MODEL: str(tokenizer_dir)})
        ),
        PrefixStoreConfig(cache_size=0),
    )
    yield service
    service.close()


def words(n: int, seed: int) -> str:
    """`n` words of the tokenizer's corpus vocabulary (about 1.25 tokens each)."""
    vocab = sorted({w.strip(".,;:!?").lower() for line in builtin_corpus() for w in line.split()})
    vocab = [w for w in vocab if w.isalpha() and w.isascii()]
    rng = random.Random(seed)
    return " ".join(rng.choice(vocab) for _ in range(n))


class Harness:
    """A running fleet of live pods behind a running gateway.

    Attributes:
        fleet: The pods.
        gateway: The gateway (precise profile unless told otherwise).
        endpoints: The endpoints file the gateway watches.
        session: An HTTP client session.
    """

    def __init__(
        self, fleet: LiveFleet, gateway: Gateway, endpoints: Path, session: aiohttp.ClientSession
    ) -> None:
        self.fleet = fleet
        self.gateway = gateway
        self.endpoints = endpoints
        self.session = session

    @property
    def url(self) -> str:
        return self.gateway.url

    @property
    def indexer(self) -> Any:
        """The precise scorer's indexer inside the gateway."""
        return self.gateway.scheduler.plugin(PRECISE).indexer

    def entries(self, pod: LivePod | str) -> int:
        """Index entries held for `pod` (real ones, not speculative)."""
        pid = pod if isinstance(pod, str) else pod.id
        return int(self.indexer.index.entries_for(pid))

    async def post(
        self, path: str, body: Any, *, base: str | None = None
    ) -> tuple[int, dict[str, str], Any]:
        """POST JSON; returns (status, headers, decoded body)."""
        async with self.session.post((base or self.url) + path, json=body) as resp:
            data = await resp.json(content_type=None)
            return resp.status, dict(resp.headers), data

    async def complete(self, body: dict[str, Any], chat: bool = False) -> tuple[str, Any]:
        """A successful non-streamed request through the gateway: (pod id, answer)."""
        path = "/v1/chat/completions" if chat else "/v1/completions"
        status, headers, data = await self.post(path, {"model": MODEL, **body})
        assert status == 200, data
        return headers["x-kvaware-endpoint"], data

    async def score(self, body: dict[str, Any]) -> dict[str, float]:
        """The precise scorer's per-endpoint scores for `body` (``/v1/score``)."""
        status, _, data = await self.post("/v1/score", {"model": MODEL, **body})
        assert status == 200, data
        scores: dict[str, float] = data["scores"][PRECISE]
        return scores

    def write_endpoints(self, pods: list[LivePod] | None = None) -> None:
        """Rewrite the endpoints file (the gateway reloads it within 50 ms)."""
        self.fleet.write_endpoints(self.endpoints, pods=pods)


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, what: str = ""
) -> None:
    """Poll `condition` every 20 ms until true; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or condition}")
        await asyncio.sleep(0.02)


HarnessFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def harness_factory(
    tmp_path: Path, tokenizer_root: Path, tokenizer_dir: Path
) -> AsyncIterator[HarnessFactory]:
    """Builds harnesses: ``await make(mode="connect"|"bind", speculative=False, **pod_opts)``.

    *connect*: every pod binds its publisher and the endpoints file names it (``kvEvents``);
    *bind*: the gateway binds one SUB socket and every pod connects to it, naming itself in
    the topic ``kv@<pod-id>@<model>``.
    """
    made: list[tuple[Harness, LiveFleet, Gateway, aiohttp.ClientSession]] = []

    async def make(
        mode: str = "connect",
        *,
        config: str = "precise.yaml",
        speculative: bool = False,
        **pod_options: Any,
    ) -> Harness:
        sub_endpoint = f"tcp://127.0.0.1:{free_port()}" if mode == "bind" else None
        options: dict[str, Any] = {
            "num_pods": 3,
            "speedup": 20.0,
            "model": MODEL,
            "tokenizer": str(tokenizer_dir),
            "kv_events_connect": sub_endpoint,
        }
        options.update(pod_options)
        fleet = LiveFleet(LivePodsConfig(**options))
        await fleet.start()
        data = scheduler_config(ROOT / "config" / config, tokenizer_root)
        for plugin in data["plugins"]:
            if plugin["type"] == PRECISE:
                params = plugin["parameters"]
                params["speculativeIndexing"] = speculative
                if sub_endpoint is not None:
                    params["kvEventsConfig"] = {"zmqEndpoint": sub_endpoint}
        endpoints = tmp_path / f"endpoints-{len(made)}.yaml"
        fleet.write_endpoints(endpoints)
        scheduler = Scheduler.from_config(data, seed=0)
        scheduler.use_endpoints_file(endpoints, poll_interval=0.05, scrape_interval=0.05)
        gateway = Gateway(
            scheduler,
            GatewayConfig(port=0, endpoint_header=True, drain_timeout=2.0, max_body_bytes=1 << 20),
            own_scheduler=True,
        )
        await gateway.start()
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        harness = Harness(fleet, gateway, endpoints, session)
        made.append((harness, fleet, gateway, session))
        if any(p["type"] == PRECISE for p in data["plugins"]):
            for pod in fleet.pods:
                assert await pod.wait_for_subscriber(5.0), f"{pod.name}: no KV-event subscriber"
        return harness

    yield make
    for _harness, fleet, gateway, session in reversed(made):
        await session.close()
        await gateway.stop()
        await fleet.stop()


def endpoints_ids(path: Path) -> list[str]:
    """Endpoint ids listed in an endpoints file."""
    data = yaml.safe_load(path.read_text())
    return [f"{e['address']}:{e['port']}" for e in data["endpoints"]]
