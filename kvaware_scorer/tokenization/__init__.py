"""Text -> token ids the way vLLM computes them: tokenizer registry, chat templates, prefix store."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kvaware_scorer.config import PrefixStoreConfig, TokenizersPoolConfig
from kvaware_scorer.metrics import Metrics

__all__ = ["TokenizationService"]


class TokenizationService:
    """Tokenizes prompts and chat messages for a model (interface; implementation in progress)."""

    def __init__(
        self,
        pool_config: TokenizersPoolConfig,
        prefix_config: PrefixStoreConfig,
        metrics: Metrics | None = None,
    ) -> None:
        self.pool_config = pool_config
        self.prefix_config = prefix_config
        self.metrics = metrics

    def tokenize(
        self,
        model: str,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        **chat: Any,
    ) -> list[int]:
        """Token ids of a completion prompt or of chat messages rendered with the chat template."""
        raise NotImplementedError("tokenization is not built yet")

    def close(self) -> None:
        """Release worker resources."""
