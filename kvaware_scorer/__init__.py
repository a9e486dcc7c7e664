"""kvaware: a KV-cache-aware scorer for LLM inference scheduling.

Public API::

    from kvaware_scorer import Indexer, IndexerConfig
    indexer = Indexer(IndexerConfig())
    indexer.score(model="m", token_ids=[...], pods=["10.0.0.1:8000"])
"""

from __future__ import annotations

from kvaware_scorer.config import IndexerConfig
from kvaware_scorer.errors import (
    BackendUnavailableError,
    ConfigError,
    EventDecodeError,
    KeyDerivationError,
    KVAwareError,
    NoEndpointError,
    TokenizerNotFoundError,
)
from kvaware_scorer.index import InMemoryIndex, KVBlockIndex, PodMatch
from kvaware_scorer.indexer import Indexer
from kvaware_scorer.scoring import ScoreResult

__all__ = [
    "BackendUnavailableError",
    "ConfigError",
    "EventDecodeError",
    "InMemoryIndex",
    "Indexer",
    "IndexerConfig",
    "KVAwareError",
    "KVBlockIndex",
    "KeyDerivationError",
    "NoEndpointError",
    "PodMatch",
    "ScoreResult",
    "TokenizerNotFoundError",
    "__version__",
]

__version__ = "0.1.0"
