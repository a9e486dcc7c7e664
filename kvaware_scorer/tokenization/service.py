"""The tokenization service: request text -> the token ids vLLM will compute, cheap on repeats.

vLLM's OpenAI server (``vllm/entrypoints/openai/completion/protocol.py`` and
``chat_completion/protocol.py``, ``vllm/renderers/``) turns a request into tokens by these
rules, mirrored here:

- Completions: the prompt text is encoded with ``add_special_tokens`` from the request,
  default True, so the tokenizer's post-processor adds what it adds (e.g. a bos token).
- Chat: the messages are rendered with the chat template (see `chat`), then the rendered text
  is encoded with ``add_special_tokens`` from the request, default False: the template already
  wrote the special tokens the model expects, adding them again would double the bos.
- Token ids given by the request (a prompt as a list of ints, ``prompt_token_ids``) are used as
  they are.

Text (the prompt, or the rendered chat) goes through the `PrefixStore` first: when a cached
prefix covers at least ``minPrefixOverlapRatio`` of its characters the cached leading tokens
are returned without tokenizing (a prefix of the full tokenization, see `TokenizationResult`).
Otherwise, for tokenizers that allow it (`BoundaryRules.stitch`), only the text after the cached
tokens is tokenized and appended to them (``stitched``: the whole tokenization, at the cost of
the new text), else the text is tokenized in full; either way the store learns the new chunks.

A chat template given by the request itself is rendered in the `RenderSandbox` (separate,
killable processes within ``renderTimeout`` / ``renderMaxChars``), never in the calling thread;
a render refused for its budget is remembered (`MAX_FAILED_RENDERS` entries) so the same request
seen again (e.g. by a second plugin) fails at once instead of rendering again.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from kvaware_scorer.config import PrefixStoreConfig, TokenizersPoolConfig
from kvaware_scorer.metrics import Metrics
from kvaware_scorer.tokenization.chat import CHAT_OPTIONS
from kvaware_scorer.tokenization.prefix_store import (
    PrefixStore,
    StitchedWords,
    WordSpans,
    safe_token_counts,
)
from kvaware_scorer.tokenization.registry import TokenizerBackend, TokenizerRegistry
from kvaware_scorer.tokenization.sandbox import RenderBudgetError, RenderSandbox

__all__ = ["TokenSource", "TokenizationResult", "TokenizationService", "request_tokenization_args"]

logger = logging.getLogger(__name__)

#: Request-template renders refused for their budget, remembered to refuse them again at once.
MAX_FAILED_RENDERS = 256

#: Where a result's tokens came from.
TokenSource = Literal["given", "prefix_store", "stitched", "tokenizer"]


@dataclass(frozen=True, slots=True)
class TokenizationResult:
    """Token ids of a request and how they were obtained.

    Attributes:
        token_ids: The tokens. From the prefix store they are the *leading* tokens of the full
            tokenization (covering `covered_chars` of `chars`), otherwise all of them.
        source: ``given``, ``prefix_store``, ``stitched`` (cached leading tokens, the rest
            tokenized from where they end) or ``tokenizer``.
        complete: Whether `token_ids` is the whole tokenization.
        chars: Characters of the tokenized text (the rendered chat for messages).
        covered_chars: Characters the tokens reach (== `chars` when complete).
        text: The tokenized text (the rendered chat for messages; None for given ids).
    """

    token_ids: list[int]
    source: TokenSource
    complete: bool
    chars: int
    covered_chars: int
    text: str | None = None


def request_tokenization_args(body: Mapping[str, Any]) -> dict[str, Any]:
    """The tokenization arguments of an OpenAI-style request body, as vLLM reads them.

    A body with ``messages`` is a chat request: the messages plus the chat fields vLLM honours
    (`CHAT_OPTIONS`) that are set. Otherwise ``prompt`` (or ``prompt_token_ids``) is used: text
    stays text, token ids become ``token_ids``; for a batch (a list of prompts) the first one is
    used, since vLLM runs each as its own request. ``add_special_tokens`` is passed on when set.

    Args:
        body: The decoded JSON body of ``/v1/completions`` or ``/v1/chat/completions``.

    Returns:
        Keyword arguments for `Indexer.score` / `TokenizationService.tokenize`: one of
        ``token_ids``, ``prompt`` or ``messages``, plus chat options.

    Raises:
        ValueError: Neither ``messages`` nor a usable ``prompt``.
    """
    if body.get("messages") is not None:
        out: dict[str, Any] = {"messages": body["messages"]}
        out.update({k: body[k] for k in sorted(CHAT_OPTIONS) if body.get(k) is not None})
        return out
    prompt = body.get("prompt")
    if prompt is None:
        prompt = body.get("prompt_token_ids")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    out = {}
    if isinstance(prompt, str):
        out["prompt"] = prompt
    elif isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        out["token_ids"] = _check_ids(prompt)
    else:
        raise ValueError("the request has neither messages nor a text or token-id prompt")
    if body.get("add_special_tokens") is not None:
        out["add_special_tokens"] = body["add_special_tokens"]
    return out


def _check_encodable(text: str) -> None:
    """Raise ValueError when `text` holds lone surrogates (the Rust tokenizer refuses them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text cannot be tokenized: {exc}") from None


def _check_ids(ids: Sequence[Any]) -> list[int]:
    out = list(ids)
    for t in out:
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise ValueError(f"token ids must be non-negative integers, got {t!r}")
    return out


class TokenizationService:
    """Tokenizes prompts and chat messages for a model exactly as vLLM does.

    Args:
        pool_config: Tokenizer sources, worker count, overlap ratio, tokenizer cache bound.
        prefix_config: Prefix-store chunk length and capacity.
        metrics: Latency by source, store lookups and tokenizer loads are recorded here.

    Example:
        >>> service = TokenizationService(TokenizersPoolConfig(local={
        ...     "modelTokenizerMap": {"m": "/path/to/tokenizer"}}), PrefixStoreConfig())
        >>> service.tokenize("m", messages=[{"role": "user", "content": "hi"}])  # doctest: +SKIP
        [2, 90, 413, 204, 75, 76, 3, 204, 2, 775, 443, 451, 204]
    """

    def __init__(
        self,
        pool_config: TokenizersPoolConfig | None = None,
        prefix_config: PrefixStoreConfig | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.pool_config = pool_config if pool_config is not None else TokenizersPoolConfig()
        self.prefix_config = prefix_config if prefix_config is not None else PrefixStoreConfig()
        self.metrics = metrics
        self.registry = TokenizerRegistry(self.pool_config, metrics=metrics)
        self.store = PrefixStore(self.prefix_config)
        self.min_overlap = self.pool_config.min_prefix_overlap_ratio
        self._executor: ThreadPoolExecutor | None = None
        self._sandbox: RenderSandbox | None = None
        self._failed: OrderedDict[bytes, str] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False

    # -- sync API ----------------------------------------------------------------------------

    def tokenize(
        self,
        model: str,
        prompt: str | Sequence[int] | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        **chat: Any,
    ) -> list[int]:
        """Token ids of a completion prompt or of chat messages rendered with the chat template.

        On a prefix-store hit these are the leading tokens only (see `tokenize_request`).

        Args:
            model: Served model name (selects the tokenizer).
            prompt: Completion prompt text, or token ids (returned as they are).
            messages: Chat messages (OpenAI format).
            **chat: vLLM request fields: ``add_special_tokens`` (both), and for messages
                ``chat_template``, ``chat_template_kwargs``, ``tools``,
                ``add_generation_prompt``, ``continue_final_message``, ``documents``,
                ``reasoning_effort``.

        Raises:
            TokenizerNotFoundError: No tokenizer for `model`.
            ValueError: Bad arguments (both or neither of prompt/messages, unknown option,
                malformed messages, no chat template, a template error).
        """
        return self.tokenize_request(model, prompt, messages, **chat).token_ids

    def tokenize_request(
        self,
        model: str,
        prompt: str | Sequence[int] | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        **chat: Any,
    ) -> TokenizationResult:
        """Like `tokenize`, with where the tokens came from and how much text they cover."""
        unknown = set(chat) - CHAT_OPTIONS
        if unknown:
            raise ValueError(
                f"unknown tokenization option(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(CHAT_OPTIONS))}"
            )
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt or messages")
        add_special = chat.pop("add_special_tokens", None)
        if add_special is not None and not isinstance(add_special, bool):
            raise ValueError(f"add_special_tokens must be a boolean, got {add_special!r}")
        t0 = time.perf_counter()
        if prompt is not None:
            chat_only = sorted(k for k, v in chat.items() if v is not None)
            if chat_only:
                raise ValueError(f"{', '.join(chat_only)} apply to chat messages, not a prompt")
            if not isinstance(prompt, str):
                if isinstance(prompt, (bytes, bytearray)):
                    raise ValueError("prompt must be text or a list of token ids, not bytes")
                ids = _check_ids(prompt)
                self._observe("given", t0)
                return TokenizationResult(ids, "given", True, 0, 0)
            tok = self.registry.get(model)
            # vLLM CompletionRequest.add_special_tokens defaults to True.
            result = self._encode(tok, prompt, True if add_special is None else add_special)
        else:
            assert messages is not None
            tok = self.registry.get(model)
            text = self._render(tok, messages, chat)
            # vLLM ChatCompletionRequest.add_special_tokens defaults to False.
            result = self._encode(tok, text, False if add_special is None else add_special)
        self._observe(result.source, t0)
        return result

    def render_chat(self, model: str, messages: Sequence[Mapping[str, Any]], **chat: Any) -> str:
        """The prompt text vLLM renders for a chat request (no tokenization).

        Raises:
            TokenizerNotFoundError: No tokenizer for `model`.
            ValueError: Malformed messages or options, no template, a template error.
        """
        unknown = set(chat) - (CHAT_OPTIONS - {"add_special_tokens"})
        if unknown:
            raise ValueError(f"unknown chat option(s) {', '.join(sorted(unknown))}")
        return self._render(self.registry.get(model), messages, chat)

    def _render(
        self, tok: TokenizerBackend, messages: Sequence[Mapping[str, Any]], chat: dict[str, Any]
    ) -> str:
        """The chat text: the tokenizer's own template renders here, a request's own template
        in the sandbox (see the module docstring)."""
        if chat.get("chat_template") is None:
            return tok.render_chat(messages, **chat)
        try:
            key = hashlib.blake2b(
                msgspec.json.encode([tok.model, messages, chat]), digest_size=16
            ).digest()
        except (TypeError, msgspec.EncodeError) as exc:
            raise ValueError(f"chat options cannot be rendered: {exc}") from None
        with self._lock:
            failed = self._failed.get(key)
            if failed is not None:
                self._failed.move_to_end(key)
                self._count_render("again")
                raise RenderBudgetError(failed, "again")
            if self._closed:
                raise RuntimeError("the tokenization service is closed")
            if self._sandbox is None:
                self._sandbox = RenderSandbox(self.pool_config)
            sandbox = self._sandbox
        try:
            text = sandbox.render(tok.model, messages, chat)
        except RenderBudgetError as exc:
            self._count_render(exc.reason)
            if exc.reason in ("timeout", "size"):
                with self._lock:
                    self._failed[key] = str(exc)
                    while len(self._failed) > MAX_FAILED_RENDERS:
                        self._failed.popitem(last=False)
            raise
        except ValueError:
            self._count_render("error")
            raise
        self._count_render("ok")
        return text

    def _count_render(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.chat_renders.labels(result).inc()

    # -- async API ---------------------------------------------------------------------------

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the tokenization service is closed")
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(
                        max_workers=self.pool_config.workers_count,
                        thread_name_prefix="kvaware-tokenize",
                    )
        return self._executor

    async def atokenize(
        self,
        model: str,
        prompt: str | Sequence[int] | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        **chat: Any,
    ) -> list[int]:
        """`tokenize` on the bounded worker pool (``workersCount``): never blocks the loop."""
        loop = asyncio.get_running_loop()
        call = functools.partial(self.tokenize, model, prompt, messages, **chat)
        return await loop.run_in_executor(self._pool(), call)

    # -- internals ---------------------------------------------------------------------------

    def _observe(self, source: str, t0: float) -> None:
        if self.metrics is not None:
            self.metrics.tokenization_latency.labels(source).observe(time.perf_counter() - t0)

    def _count_lookup(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.prefix_store_lookups.labels(result).inc()

    def _encode(
        self, tok: TokenizerBackend, text: str, add_special_tokens: bool
    ) -> TokenizationResult:
        n = len(text)
        store = self.store
        rules = tok.store_rules
        usable = (
            rules is not None
            and store.capacity > 0
            and n >= store.block_size
            and (not add_special_tokens or tok.special_prefix is not None)
        )
        if not usable:
            ids = self._encode_text(tok, text, add_special_tokens)
            return TokenizationResult(ids, "tokenizer", True, n, n, text)
        assert rules is not None
        keys = store.chunk_keys(tok.namespace, text)
        hit = store.lookup(keys)
        if hit.tokens and hit.covered_chars >= self.min_overlap * n:
            self._count_lookup("hit")
            prefix = tok.special_prefix if add_special_tokens else None
            ids = prefix + hit.tokens if prefix else hit.tokens
            return TokenizationResult(ids, "prefix_store", False, n, hit.covered_chars, text)
        self._count_lookup("partial" if hit.chunks else "miss")
        source: TokenSource = "tokenizer"
        if hit.tokens and rules.stitches_at(text, hit.covered_chars):
            # NOTE: the cached tokens end at a pre-token boundary of the fresh tokenization;
            # from there on the tokenizer cuts the text the same way whether it starts there
            # or not, so only the new text is tokenized (a growing conversation's next turn
            # costs its own text, not the whole context again).
            cut, count = hit.covered_chars, len(hit.tokens)
            tail, tail_words = self._encode_words(tok, text[cut:])
            plain = hit.tokens + tail
            words: WordSpans = StitchedWords(count, cut, tail_words)
            start, floor = hit.chunks, (count, cut)
            source = "stitched"
        else:
            plain, words = self._encode_words(tok, text)
            start, floor = 0, (0, 0)
        counts, cuts = safe_token_counts(text, words, store.block_size, rules, start, floor)
        store.insert(keys, counts, cuts, plain, start, floor[0])
        if self.metrics is not None:
            self.metrics.prefix_store_entries.set(len(store))
        if add_special_tokens:
            assert tok.special_prefix is not None
            ids = tok.special_prefix + plain + tok.special_suffix
        else:
            ids = plain
        return TokenizationResult(ids, source, True, n, n, text)

    @staticmethod
    def _encode_text(tok: TokenizerBackend, text: str, add_special_tokens: bool) -> list[int]:
        try:
            return tok.encode(text, add_special_tokens)
        except (TypeError, UnicodeError):
            _check_encodable(text)
            raise

    @staticmethod
    def _encode_words(tok: TokenizerBackend, text: str) -> tuple[list[int], WordSpans]:
        try:
            return tok.encode_words(text)
        except (TypeError, UnicodeError):
            _check_encodable(text)
            raise

    def close(self) -> None:
        """Stop the worker pool and drop loaded tokenizers and the prefix store."""
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
            sandbox, self._sandbox = self._sandbox, None
        if sandbox is not None:
            sandbox.close()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        self.registry.clear()
        self.store.clear()
