"""The Envoy ext_proc Endpoint Picker (``kvaware epp``): a drop-in for the Go EPP behind Envoy,
Envoy Gateway, Istio, kgateway or Envoy AI Gateway, running the scheduler ``kvaware serve`` runs.

Public API::

    from kvaware_scorer.epp import EndpointPicker, EppConfig
    picker = EndpointPicker(scheduler, EppConfig(grpc_port=0, secure_serving=False))
    await picker.start()      # picker.grpc_port
    ...
    await picker.stop()       # drains in-flight streams

The names are resolved on first use, so this package imports without the optional ``grpcio`` /
``xds-protos`` dependencies (``pip install 'kvaware-scorer[epp]'``) until the server is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvaware_scorer.epp.config import EppConfig
    from kvaware_scorer.epp.discovery import KubernetesDiscovery, PoolSpec
    from kvaware_scorer.epp.envoy import EnvoyProcess, bootstrap, envoy_binary, write_bootstrap
    from kvaware_scorer.epp.front import EnvoyFront
    from kvaware_scorer.epp.metrics import EppMetrics
    from kvaware_scorer.epp.server import EXT_PROC_SERVICE, EndpointPicker

__all__ = [
    "EXT_PROC_SERVICE",
    "EndpointPicker",
    "EnvoyFront",
    "EnvoyProcess",
    "EppConfig",
    "EppMetrics",
    "KubernetesDiscovery",
    "PoolSpec",
    "bootstrap",
    "envoy_binary",
    "write_bootstrap",
]

_WHERE = {
    "EppConfig": "config",
    "KubernetesDiscovery": "discovery",
    "PoolSpec": "discovery",
    "EnvoyProcess": "envoy",
    "bootstrap": "envoy",
    "envoy_binary": "envoy",
    "write_bootstrap": "envoy",
    "EnvoyFront": "front",
    "EppMetrics": "metrics",
    "EXT_PROC_SERVICE": "server",
    "EndpointPicker": "server",
}

#: Modules whose absence means the ``epp`` extra is not installed.
MISSING_EXTRA = ("grpc", "grpc_health", "envoy", "google", "kubernetes", "cryptography")


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in MISSING_EXTRA:
            raise ImportError(
                f"the endpoint picker needs {exc.name}: pip install 'kvaware-scorer[epp]'"
            ) from exc
        raise
