"""Which endpoint serves which model: the endpoints file's ``model`` plus each pod's
``GET /v1/models``.

Rule: endpoint E serves model M when M is E's configured ``model`` or an ``id`` in the last
successful answer of E's ``/v1/models``. vLLM lists its LoRA adapters there with ``parent`` set
to the base model, and a request may name an adapter as its ``model`` (as vLLM accepts); such a
request is scheduled as the base model with ``lora_name`` set to the adapter, on the endpoints
that list the adapter. An endpoint with neither a configured model nor a successful poll serves
nothing yet. A failed poll keeps the previous answer (a pod that is briefly unreachable keeps
its models; connection failures are handled by the gateway's retries).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import yarl

from kvaware_scorer.scheduler.types import Endpoint

if TYPE_CHECKING:
    from kvaware_scorer.gateway.metrics import GatewayMetrics

__all__ = ["ModelCatalog", "Resolution"]

logger = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class _Served:
    ids: frozenset[str]
    cards: tuple[dict[str, Any], ...]
    loras: dict[str, str]  # adapter name -> base model
    updated: float


@dataclass(slots=True)
class Resolution:
    """Where a requested model can go.

    Attributes:
        endpoints: Endpoints of the pool that serve it (pool order).
        model: The base model to schedule as.
        lora_name: The LoRA adapter, when the request named one.
    """

    endpoints: list[Endpoint]
    model: str
    lora_name: str | None


def parse_models(payload: Any) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Model cards and LoRA adapters (adapter -> base) from a ``/v1/models`` answer.

    Raises:
        ValueError: Not an OpenAI model list.
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise ValueError("not an OpenAI model list (no 'data' array)")
    cards: list[dict[str, Any]] = []
    loras: dict[str, str] = {}
    for card in payload["data"]:
        if not isinstance(card, dict) or not isinstance(card.get("id"), str) or not card["id"]:
            continue
        cards.append(card)
        parent = card.get("parent")
        if isinstance(parent, str) and parent and parent != card["id"]:
            loras[card["id"]] = parent
    return cards, loras


class ModelCatalog:
    """Models served per endpoint, polled from the pods, for request validation and
    ``GET /v1/models``.

    Args:
        session: The HTTP session used to poll pods.
        timeout: Seconds per poll.
        clock: Monotonic clock (poll timestamps).
        metrics: Counts polls by result.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.clock = clock
        self.metrics = metrics
        self._served: dict[str, _Served] = {}
        self._unreachable: set[str] = set()  # endpoints of the pool only (see `forget`)

    def reachable(self, endpoint_id: str) -> bool:
        """False when the last contact with the endpoint (a poll or a forwarded request)
        failed to connect or timed out; any HTTP answer makes it reachable again."""
        return endpoint_id not in self._unreachable

    def mark(self, endpoint_id: str, *, reachable: bool) -> None:
        """Record the outcome of a contact with an endpoint of the pool."""
        if reachable:
            self._unreachable.discard(endpoint_id)
        else:
            self._unreachable.add(endpoint_id)

    def known(self, endpoint_id: str) -> bool:
        """Whether a poll of the endpoint has ever succeeded."""
        return endpoint_id in self._served

    def resolve(self, model: str, pool: Sequence[Endpoint]) -> Resolution:
        """The endpoints of `pool` serving `model`, and the base model / LoRA to schedule."""
        served = self._served
        endpoints: list[Endpoint] = []
        base: str | None = None
        for e in pool:
            if e.model == model:
                endpoints.append(e)
                continue
            s = served.get(e.id)
            if s is not None and model in s.ids:
                endpoints.append(e)
                parent = s.loras.get(model)
                if parent is not None:
                    base = parent
        if base is not None:
            return Resolution(endpoints, base, model)
        return Resolution(endpoints, model, None)

    def base_models(self, pool: Sequence[Endpoint]) -> list[str]:
        """The ids of the models `pool` serves, LoRA adapters left out (an adapter shares its
        base model's tokenizer; vLLM's card names the base as its ``parent``)."""
        return [card["id"] for card in self.models(pool) if not card.get("parent")]

    def models(self, pool: Sequence[Endpoint]) -> list[dict[str, Any]]:
        """The union of the models served by `pool`, as OpenAI model cards (first card of
        each id wins; a configured model no pod listed gets a minimal card)."""
        out: dict[str, dict[str, Any]] = {}
        for e in pool:
            s = self._served.get(e.id)
            if s is not None:
                for card in s.cards:
                    out.setdefault(card["id"], card)
        for e in pool:
            if e.model and e.model not in out:
                out[e.model] = {"id": e.model, "object": "model", "created": 0, "owned_by": "vllm"}
        return list(out.values())

    def forget(self, keep: Iterable[str]) -> None:
        """Drop what is known about endpoints not in `keep`."""
        live = set(keep)
        for eid in [k for k in self._served if k not in live]:
            del self._served[eid]
        self._unreachable &= live

    async def poll(self, endpoint: Endpoint) -> bool:
        """Poll one endpoint's ``/v1/models``; returns whether it answered with a model list."""
        url = yarl.URL.build(
            scheme="http", host=endpoint.address, port=endpoint.port, path="/v1/models"
        )
        try:
            # NOTE: a redirect is a failed poll: only endpoints of the pool are contacted.
            async with self.session.get(url, timeout=self.timeout, allow_redirects=False) as resp:
                self._unreachable.discard(endpoint.id)
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                payload = await resp.json(content_type=None)
            cards, loras = parse_models(payload)
        except (aiohttp.ClientError, TimeoutError, ValueError, RecursionError) as exc:
            # NOTE: ValueError covers malformed JSON and bytes that are not UTF-8; RecursionError
            # nesting deeper than the JSON decoder recurses. A pod's answer is input too.
            if isinstance(exc, aiohttp.ClientConnectionError | TimeoutError):
                self._unreachable.add(endpoint.id)
            if self.metrics is not None:
                self.metrics.models_polls.labels("error").inc()
            logger.debug("GET /v1/models of %s failed: %s", endpoint.id, exc)
            return False
        ids = frozenset(c["id"] for c in cards)
        old = self._served.get(endpoint.id)
        if old is None or old.ids != ids:
            logger.info("endpoint %s serves %s", endpoint.id, sorted(ids))
        self._served[endpoint.id] = _Served(ids, tuple(cards), loras, self.clock())
        if self.metrics is not None:
            self.metrics.models_polls.labels("ok").inc()
        return True

    async def refresh(self, pool: Sequence[Endpoint]) -> int:
        """Poll every endpoint of `pool` concurrently and forget the others; returns how many
        answered."""
        self.forget(e.id for e in pool)
        if not pool:
            return 0
        results = await asyncio.gather(*(self.poll(e) for e in pool))
        return sum(results)
