"""Applies vLLM KV-event payloads to an indexer's index (interface; implementation in progress)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvaware_scorer.indexer import Indexer

__all__ = ["EventIngestor"]


class EventIngestor:
    """Decodes payload frames and applies their events, per pod and in order."""

    def __init__(self, indexer: Indexer) -> None:
        self.indexer = indexer

    def ingest(self, pod: str, model: str | None, payload: bytes, seq: int | None = None) -> None:
        """Apply one payload frame from `pod`."""
        raise NotImplementedError("event ingestion is not built yet")

    def forget_pod(self, pod: str) -> None:
        """Drop per-pod stream state (sequence numbers) after a purge."""
