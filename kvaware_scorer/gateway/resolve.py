"""Which endpoints may serve a request's model: the `ModelCatalog` kept fresh (a periodic
refresh, woken early when endpoints join the pool), endpoints that never listed their models
polled on demand, and pods in their connection-failure cooldown left out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from kvaware_scorer.gateway.catalog import ModelCatalog, Resolution
from kvaware_scorer.gateway.forward import Cooldowns
from kvaware_scorer.gateway.protocol import APIError
from kvaware_scorer.scheduler import Endpoint, Scheduler

__all__ = ["Resolver"]

logger = logging.getLogger(__name__)

#: Seconds between on-demand polls of endpoints that never listed their models.
_UNKNOWN_POLL_INTERVAL = 1.0


class Resolver:
    """Resolves a model to its candidate endpoints (once `start` gave it the catalog).

    Args:
        scheduler: Its pool is the set of endpoints resolved among.
        cooldowns: Pods left out after refusing a connection.
        refresh_interval: Seconds between refreshes of every endpoint's model list.
    """

    def __init__(self, scheduler: Scheduler, cooldowns: Cooldowns, refresh_interval: float) -> None:
        self.scheduler = scheduler
        self.cooldowns = cooldowns
        self.refresh_interval = refresh_interval
        self.catalog: ModelCatalog | None = None
        self.wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._unknown_poll: asyncio.Future[None] | None = None
        self._unknown_polled = -math.inf

    def start(self, catalog: ModelCatalog) -> None:
        """Resolve with `catalog` and refresh it in the background (on the running loop)."""
        self.catalog = catalog
        self.wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(
            self._refresh_loop(self.wake), name="kvaware-models"
        )

    async def close(self) -> None:
        """Stop the on-demand poll and the periodic refresh in progress."""
        if self._unknown_poll is not None:
            self._unknown_poll.cancel()
            self._unknown_poll = None
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def endpoints_added(self) -> None:
        """Refresh the catalog now (endpoints joined the pool)."""
        if self.wake is not None:
            self.wake.set()

    async def _refresh_loop(self, wake: asyncio.Event) -> None:
        catalog = self.catalog
        assert catalog is not None
        while True:
            try:
                await asyncio.wait_for(wake.wait(), self.refresh_interval)
            except TimeoutError:
                pass
            wake.clear()
            try:
                await catalog.refresh(self.scheduler.endpoints)
            except Exception:
                logger.exception("refreshing the model catalog failed")

    async def resolve(self, model: str) -> Resolution:
        """The candidates for `model`, without pods in their connection-failure cooldown.

        When no endpoint is known to serve `model` but some never listed their models (a pod
        still starting), those are polled now (one poll shared by concurrent requests, at most
        one per second) rather than failing until the next periodic refresh.

        Raises:
            APIError: 503 when the pool is empty or only endpoints that never listed their
                models could serve `model`, 404 when no endpoint serves it.
        """
        pool = self.scheduler.endpoints
        if not pool:
            raise APIError(503, "No endpoints are available.", code="no_endpoint")
        catalog = self.catalog
        assert catalog is not None
        res = catalog.resolve(model, pool)
        if not res.endpoints:
            unknown = [e for e in pool if not e.model and not catalog.known(e.id)]
            if unknown:
                await self._poll_unknown(unknown)
                res = catalog.resolve(model, pool)
                unknown = [e for e in unknown if not catalog.known(e.id)]
        if not res.endpoints:
            if unknown:
                raise APIError(
                    503,
                    f"No endpoint serving the model `{model}` is ready: {len(unknown)} "
                    "endpoint(s) have not listed their models yet.",
                    param="model",
                    code="model_not_ready",
                )
            raise APIError(
                404,
                f"The model `{model}` does not exist or is not served by any endpoint.",
                param="model",
                code="model_not_found",
            )
        res.endpoints = self.cooldowns.usable(res.endpoints)
        return res

    async def _poll_unknown(self, unknown: list[Endpoint]) -> None:
        task = self._unknown_poll
        if task is None:
            if time.monotonic() - self._unknown_polled < _UNKNOWN_POLL_INTERVAL:
                return
            task = self._unknown_poll = asyncio.ensure_future(self._poll_endpoints(unknown))
        # NOTE: shielded: a client going away must not cancel the poll other requests await.
        await asyncio.shield(task)

    async def _poll_endpoints(self, endpoints: list[Endpoint]) -> None:
        assert self.catalog is not None
        try:
            await asyncio.gather(*(self.catalog.poll(e) for e in endpoints))
        finally:
            self._unknown_polled = time.monotonic()
            self._unknown_poll = None
