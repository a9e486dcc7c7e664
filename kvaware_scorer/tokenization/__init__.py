"""Text -> token ids the way vLLM computes them: tokenizer registry, chat templates, prefix store.

- `TokenizationService`: the entry point (``tokenize(model, prompt=... | messages=...)``).
- `TokenizerRegistry`: finds and caches tokenizers (explicit map, discovery dir, hub).
- `PrefixStore`: text-chunk hashes -> tokens, so repeated prefixes skip tokenization.
- `chat`: vLLM's message parsing and chat-template rules.
- `RenderSandbox`: renders request-supplied chat templates in killable worker processes.
- `local`: a deterministic offline tokenizer builder (tests, emulator, demo).

Importing this package loads neither transformers nor tokenizers; they are imported when a
tokenizer is first loaded or built (the ``tokenizers`` extra).
"""

from __future__ import annotations

from kvaware_scorer.tokenization.chat import (
    CHAT_OPTIONS,
    build_template_kwargs,
    detect_content_format,
    normalize_tools,
    parse_messages,
)
from kvaware_scorer.tokenization.local import (
    build_tokenizer,
    builtin_corpus,
    chatml_template,
    install_local_tokenizer,
)
from kvaware_scorer.tokenization.prefix_store import (
    BoundaryRules,
    EncodingWords,
    PrefixHit,
    PrefixStore,
    PrefixStoreStats,
    Words,
    WordSpans,
    safe_token_counts,
)
from kvaware_scorer.tokenization.registry import (
    HFTokenizer,
    TokenizerBackend,
    TokenizerRegistry,
    discover_tokenizers,
    hub_offline,
)
from kvaware_scorer.tokenization.sandbox import RenderBudgetError, RenderSandbox
from kvaware_scorer.tokenization.service import (
    TokenizationResult,
    TokenizationService,
    TokenSource,
    request_tokenization_args,
)

__all__ = [
    "CHAT_OPTIONS",
    "BoundaryRules",
    "EncodingWords",
    "HFTokenizer",
    "PrefixHit",
    "PrefixStore",
    "PrefixStoreStats",
    "RenderBudgetError",
    "RenderSandbox",
    "TokenSource",
    "TokenizationResult",
    "TokenizationService",
    "TokenizerBackend",
    "TokenizerRegistry",
    "WordSpans",
    "Words",
    "build_template_kwargs",
    "build_tokenizer",
    "builtin_corpus",
    "chatml_template",
    "detect_content_format",
    "discover_tokenizers",
    "hub_offline",
    "install_local_tokenizer",
    "normalize_tools",
    "parse_messages",
    "request_tokenization_args",
    "safe_token_counts",
]
