"""OpenAI-compatible routing proxy (the production main job): schedules each request with the
configured profile and forwards it to the chosen vLLM pod.

Public API::

    from kvaware_scorer.gateway import Gateway, GatewayConfig
    gateway = Gateway.from_files("config/precise.yaml", "endpoints.yaml", GatewayConfig(port=0))
    await gateway.start()      # gateway.url
    ...
    await gateway.stop()       # drains in-flight requests
"""

from __future__ import annotations

from kvaware_scorer.gateway.app import Gateway
from kvaware_scorer.gateway.catalog import ModelCatalog, Resolution, parse_models
from kvaware_scorer.gateway.config import GatewayConfig, load_gateway_config
from kvaware_scorer.gateway.explain import explain
from kvaware_scorer.gateway.metrics import GatewayMetrics
from kvaware_scorer.gateway.protocol import APIError, ParsedRequest, RequestParser, error_body

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
