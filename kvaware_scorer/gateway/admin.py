"""The gateway's routes that forward nothing: ``POST /v1/score`` (explains the decision a
request would get), ``GET /v1/models`` (union over the pool), the health routes, ``GET /metrics``
and the OpenAI-shaped 404/405 for every other path and method.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvaware_scorer.errors import NoEndpointError
from kvaware_scorer.gateway.answers import Answers, json_response
from kvaware_scorer.gateway.catalog import ModelCatalog
from kvaware_scorer.gateway.explainer import explain
from kvaware_scorer.gateway.forward import Cooldowns
from kvaware_scorer.gateway.intake import RequestIntake
from kvaware_scorer.gateway.metrics import GatewayMetrics
from kvaware_scorer.gateway.protocol import APIError, RequestParser, error_body
from kvaware_scorer.gateway.resolve import Resolver
from kvaware_scorer.scheduler import Endpoint, Scheduler

__all__ = ["ROUTES", "AdminRoutes"]

logger = logging.getLogger(__name__)

#: Every route the gateway serves, with its method (for the 405 of a known path).
ROUTES = {
    "/v1/completions": "POST",
    "/v1/chat/completions": "POST",
    "/v1/score": "POST",
    "/v1/models": "GET",
    "/health": "GET",
    "/health/live": "GET",
    "/health/ready": "GET",
    "/metrics": "GET",
}


class AdminRoutes:
    """Handlers of the routes that forward nothing.

    Args:
        scheduler: The scheduler (pool, dry-run decisions, metrics registry).
        metrics: The gateway's metrics.
        answers: Builds and counts the answers.
        intake: Credentials, body and prompt checks.
        parser: Request-body parser.
        resolver: Resolves a model to its candidates.
        cooldowns: Pods in their connection-failure cooldown.
        catalog: The model catalog, None while the gateway is not running.
        status: Whether the gateway is draining, and how many requests are in flight.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        metrics: GatewayMetrics,
        answers: Answers,
        intake: RequestIntake,
        parser: RequestParser,
        resolver: Resolver,
        cooldowns: Cooldowns,
        catalog: Callable[[], ModelCatalog | None],
        status: Callable[[], tuple[bool, int]],
    ) -> None:
        self.scheduler = scheduler
        self.metrics = metrics
        self.answers = answers
        self.intake = intake
        self.parser = parser
        self.resolver = resolver
        self.cooldowns = cooldowns
        self.catalog = catalog
        self.status = status

    def _running_catalog(self) -> ModelCatalog:
        catalog = self.catalog()
        if catalog is None:
            raise RuntimeError("the gateway is not running")
        return catalog

    def usable_endpoints(self) -> int:
        """Endpoints of the pool a request could be sent to now: not in their connection-failure
        cooldown, and not found unreachable by their last ``/v1/models`` poll or request."""
        cooldowns = self.cooldowns
        now = time.monotonic()
        catalog = self.catalog()
        n = 0
        for e in self.scheduler.endpoints:
            if cooldowns.cooling(e.id, now):
                continue
            if catalog is not None and not catalog.reachable(e.id):
                continue
            n += 1
        return n

    async def score(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/score``: the decision a request would get, explained (nothing is sent)."""
        t0 = time.perf_counter()
        route = "score"
        denied = self.intake.deny(request, admin=True)
        if denied is not None:
            return self.answers.denied(route, denied, t0)
        try:
            body = await self.intake.read_body(request)
            chat = self.parser.is_chat(body)
            parsed = self.parser.chat(body) if chat else self.parser.completion(body)
            self.intake.check_request(parsed)
            res = await self.resolver.resolve(parsed.model)
        except APIError as err:
            return self.answers.error(route, err, t0, close=err.status in (408, 413))
        sreq = self.intake.scheduling_request(request, parsed, res)
        try:
            result = await self.scheduler.aschedule(sreq, res.endpoints, dry_run=True)
            self.intake.check_scheduled(sreq)
        except APIError as err:
            return self.answers.error(route, err, t0)
        except NoEndpointError as exc:
            return self.answers.error(
                route,
                APIError(503, f"No endpoint can serve this request: {exc}", code="no_endpoint"),
                t0,
            )
        except Exception:
            logger.exception("%s: explaining the decision failed", sreq.request_id)
            return self.answers.error(
                route, APIError(500, "Scheduling failed.", code="internal_error"), t0
            )
        out = {
            "object": "kvaware.score",
            "model": parsed.model,
            "scheduled_model": sreq.model,
            "lora_name": sreq.lora_name,
            "kind": "chat" if chat else "completion",
            "prompt_tokens": len(sreq.token_ids) if sreq.token_ids is not None else None,
            **explain(result, res.endpoints),
            "excluded": self._excluded(parsed.model, res.endpoints),
        }
        self.answers.count(route, 200, t0)
        return json_response(out)

    def _excluded(self, model: str, candidates: list[Endpoint]) -> dict[str, str]:
        """Why each endpoint of the pool was not a candidate for `model`."""
        ids = {e.id for e in candidates}
        pool = self.scheduler.endpoints
        # NOTE: the cooldown is only why a pod serving the model was left out.
        serving = {e.id for e in self._running_catalog().resolve(model, pool).endpoints}
        excluded: dict[str, str] = {}
        for e in pool:
            if e.id in ids:
                continue
            excluded[e.id] = (
                "connection refused recently"
                if e.id in serving and e.id in self.cooldowns
                else "does not serve the model"
            )
        return excluded

    async def models(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/models``: the models served over the pool."""
        denied = self.intake.deny(request, admin=False)
        if denied is not None:
            return self.answers.denied("models", denied, time.perf_counter())
        catalog = self._running_catalog()
        return json_response({"object": "list", "data": catalog.models(self.scheduler.endpoints)})

    async def ready(self, request: web.Request) -> web.StreamResponse:
        """``GET /health``, ``/health/ready``: 503 while draining or with no usable endpoint."""
        draining, inflight = self.status()
        if draining:
            return json_response({"status": "draining", "inflight": inflight}, 503)
        usable = self.usable_endpoints()
        return json_response(
            {
                "status": "ok" if usable else "unavailable",
                "endpoints": len(self.scheduler.endpoints),
                "usable": usable,
                "inflight": inflight,
            },
            200 if usable else 503,
        )

    async def live(self, request: web.Request) -> web.StreamResponse:
        """``GET /health/live``: always ok."""
        return json_response({"status": "ok"})

    async def metrics_route(self, request: web.Request) -> web.StreamResponse:
        """``GET /metrics``: the scheduler's and the gateway's metrics."""
        denied = self.intake.deny(request, admin=True)
        if denied is not None:
            return self.answers.denied("metrics", denied, time.perf_counter())
        data = generate_latest(self.scheduler.metrics_registry) + generate_latest(
            self.metrics.registry
        )
        resp = web.Response(body=data)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def unknown(self, request: web.Request) -> web.StreamResponse:
        """Every other path (404) or method (405, with ``Allow``)."""
        method = ROUTES.get(request.path)
        if method is not None:
            resp = json_response(
                error_body(
                    f"Method {request.method} is not allowed on {request.path}; use {method}.",
                    "invalid_request_error",
                    None,
                    "method_not_allowed",
                ),
                405,
            )
            resp.headers["Allow"] = method
            return resp
        return json_response(
            error_body(f"Unknown path {request.path}.", "invalid_request_error", None, "not_found"),
            404,
        )
