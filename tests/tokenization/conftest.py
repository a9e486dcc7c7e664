"""Real tokenizers for the tokenization tests, trained once per session with the builder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvaware_scorer.config import PrefixStoreConfig, TokenizersPoolConfig
from kvaware_scorer.tokenization import TokenizationService, install_local_tokenizer

#: GPT-2 style byte-level BPE, no normalizer, ChatML template, no bos added.
CHATML_MODEL = "acme/chatml-bpe"
#: Llama-3/Qwen2 style: NFC normalizer, split regex, post-processor adds bos, template writes bos.
LLAMA_MODEL = "acme/llama-bpe"
MODELS = (CHATML_MODEL, LLAMA_MODEL)


@pytest.fixture(scope="session")
def tokenizer_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A discovery root holding both test tokenizers in the nested ``org/name`` layout."""
    root = tmp_path_factory.mktemp("tokenizers")
    install_local_tokenizer(root, CHATML_MODEL)
    install_local_tokenizer(root, LLAMA_MODEL, style="split", add_bos_token=True)
    return root


@pytest.fixture(scope="session")
def hf_tokenizers(tokenizer_root: Path) -> dict[str, Any]:
    """The transformers tokenizers (the fidelity oracle), loaded as vLLM loads them."""
    from transformers import AutoTokenizer

    return {m: AutoTokenizer.from_pretrained(str(tokenizer_root / m)) for m in MODELS}


@pytest.fixture
def make_service(tokenizer_root: Path) -> Iterator[Callable[..., TokenizationService]]:
    """Builds services that find the test tokenizers by auto-discovery; closes them after."""
    made: list[TokenizationService] = []

    def factory(
        *, ratio: float = 0.8, block_size: int = 256, cache_size: int = 500_000, **pool: Any
    ) -> TokenizationService:
        pool_cfg = TokenizersPoolConfig.model_validate(
            {
                "minPrefixOverlapRatio": ratio,
                "local": {"autoDiscoveryDir": str(tokenizer_root)},
                **pool,
            }
        )
        service = TokenizationService(
            pool_cfg, PrefixStoreConfig(block_size=block_size, cache_size=cache_size)
        )
        made.append(service)
        return service

    yield factory
    for service in made:
        service.close()
