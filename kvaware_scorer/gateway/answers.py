"""The gateway's own answers: JSON bodies, errors in the OpenAI shape, and the per-route
request counters (``kvaware_gateway_requests``, ``kvaware_gateway_request_duration``) every
answer is counted in.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from aiohttp import web

from kvaware_scorer.gateway.metrics import GatewayMetrics
from kvaware_scorer.gateway.protocol import APIError

__all__ = ["JSON", "Answers", "json_response"]

JSON = "application/json"


def json_response(data: Any, status: int = 200) -> web.Response:
    """A JSON answer (msgspec-encoded)."""
    return web.Response(body=msgspec.json.encode(data), status=status, content_type=JSON)


class Answers:
    """Builds and counts the answers the gateway gives itself.

    Args:
        metrics: The gateway's metrics.
    """

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        # Bounded: one entry per (route, status class).
        self._counted: dict[tuple[str, int], Any] = {}

    def count(self, route: str, status: int, t0: float) -> None:
        """Count one answer of `route` with `status`, begun at `t0` (`time.perf_counter`)."""
        key = (route, status // 100)
        child = self._counted.get(key)
        if child is None:
            child = self._counted[key] = (
                self.metrics.requests.labels(route, f"{status // 100}xx"),
                self.metrics.duration.labels(route),
            )
        child[0].inc()
        child[1].observe(time.perf_counter() - t0)

    def error(self, route: str, err: APIError, t0: float, *, close: bool = False) -> web.Response:
        """The answer for `err`, counted (a client error with a code also as rejected);
        `close`: close the connection after it."""
        self.count(route, err.status, t0)
        if err.status < 500 and err.code is not None:
            self.metrics.rejected.labels(err.code).inc()
        resp = web.Response(
            body=msgspec.json.encode(err.body()), status=err.status, content_type=JSON
        )
        if close:
            resp.force_close()
        return resp

    def denied(self, route: str, err: APIError, t0: float) -> web.Response:
        """The answer for a missing (401, with its challenge) or wrong (403) credential."""
        resp = self.error(route, err, t0)
        if err.status == 401:
            resp.headers["WWW-Authenticate"] = "Bearer"
        return resp
