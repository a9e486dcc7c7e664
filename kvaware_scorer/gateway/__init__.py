"""OpenAI-compatible routing proxy (the production main job): schedules each request with the
configured profile and forwards it to the chosen vLLM pod.

Public API::

    from kvaware_scorer.gateway import Gateway, GatewayConfig
    gateway = Gateway.from_files("config/precise.yaml", "endpoints.yaml", GatewayConfig(port=0))
    await gateway.start()      # gateway.url
    ...
    await gateway.stop()       # drains in-flight requests

The names are resolved on first use, so this package imports without the optional ``aiohttp``
dependency (``pip install 'kvaware-scorer[gateway]'``) until the proxy itself is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvaware_scorer.gateway.app import Gateway
    from kvaware_scorer.gateway.catalog import ModelCatalog, Resolution, parse_models
    from kvaware_scorer.gateway.config import GatewayConfig, load_gateway_config
    from kvaware_scorer.gateway.explainer import explain
    from kvaware_scorer.gateway.metrics import GatewayMetrics
    from kvaware_scorer.gateway.protocol import (
        APIError,
        ParsedRequest,
        RequestParser,
        error_body,
    )

__all__ = [
    "APIError",
    "Gateway",
    "GatewayConfig",
    "GatewayMetrics",
    "ModelCatalog",
    "ParsedRequest",
    "RequestParser",
    "Resolution",
    "error_body",
    "explain",
    "load_gateway_config",
    "parse_models",
]

_WHERE = {
    "Gateway": "app",
    "ModelCatalog": "catalog",
    "Resolution": "catalog",
    "parse_models": "catalog",
    "GatewayConfig": "config",
    "load_gateway_config": "config",
    "explain": "explainer",
    "GatewayMetrics": "metrics",
    "APIError": "protocol",
    "ParsedRequest": "protocol",
    "RequestParser": "protocol",
    "error_body": "protocol",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    except ModuleNotFoundError as exc:
        if exc.name in ("aiohttp", "yarl", "multidict"):
            raise ImportError(
                f"the gateway needs {exc.name}: pip install 'kvaware-scorer[gateway]'"
            ) from exc
        raise
