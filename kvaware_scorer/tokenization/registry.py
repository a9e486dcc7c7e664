"""The tokenizer registry: find, load (transformers ``AutoTokenizer``) and cache model tokenizers.

Sources, in order: ``modelTokenizerMap``; ``autoDiscoveryDir`` (Hugging Face cache layout
``models--org--name/snapshots/<rev>/`` and nested ``org/name/`` folders); the built-in
``kvaware/sim`` tokenizer; the hub, only when ``hf.enabled`` (its local cache only when
``HF_HUB_OFFLINE`` is set). A model found nowhere is warned about once, naming the settings to
fix. Loaded tokenizers are kept in a bounded LRU; the registry is thread-safe, loads a model at
most once at a time, and remembers a missing model for ``autoDiscoveryRefreshSeconds``.

`HFTokenizer` wraps a loaded tokenizer: chat renders through transformers (as in vLLM),
encoding goes to a private copy of the Rust tokenizer (``encode_batch`` releases the GIL; the
copy is never reconfigured, so concurrent calls are safe), its post-processor's special tokens
checked against transformers at load time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from kvaware_scorer.config import TokenizersPoolConfig
from kvaware_scorer.errors import TokenizerNotFoundError
from kvaware_scorer.extras import missing_extras, missing_extras_message
from kvaware_scorer.resources import BUILTIN_TOKENIZER_MODEL, builtin_tokenizer
from kvaware_scorer.tokenization.chat import ChatTemplateCache, render_chat
from kvaware_scorer.tokenization.prefix_store import BoundaryRules, EncodingWords, WordSpans

if TYPE_CHECKING:
    from kvaware_scorer.metrics import Metrics

__all__ = [
    "HFTokenizer",
    "TokenizerBackend",
    "TokenizerRegistry",
    "discover_tokenizers",
    "hub_offline",
]

logger = logging.getLogger(__name__)

_HF_CACHE_DIR = re.compile(r"^models--(.+)$")
_MAX_DISCOVERY_DEPTH = 8
_MAX_DISCOVERY_DIRS = 200_000
#: Failed loads remembered at most (model names come from requests: any string).
_MAX_MISSES = 1024
_TRUTHY = frozenset({"1", "on", "yes", "true"})

# Pipeline parts whose effect on the text is local (bounded lookahead, see prefix_store.py).
_LOCAL_NORMALIZERS = frozenset(
    {
        "NFC",
        "NFD",
        "NFKC",
        "NFKD",
        "Lowercase",
        "Strip",
        "StripAccents",
        "Prepend",
        "Replace",
        "BertNormalizer",
        "Nmt",
        "Precompiled",
        "ByteLevel",
    }
)
_LOCAL_PRE_TOKENIZERS = frozenset(
    {
        "ByteLevel",
        "Split",
        "Metaspace",
        "Whitespace",
        "WhitespaceSplit",
        "Punctuation",
        "Digits",
        "BertPreTokenizer",
        "UnicodeScripts",
        "CharDelimiterSplit",
        "FixedLength",
    }
)
_PROBES = ("hello world", "a", " x\n\ny  z ", "<|probe|> 12345")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for no network access."""
    return any(
        os.environ.get(name, "").strip().lower() in _TRUTHY
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@runtime_checkable
class TokenizerBackend(Protocol):
    """What the tokenization service needs from a model's tokenizer.

    Attributes:
        model: Model name it serves.
        source: Where it was loaded from (a path or ``hub:<name>``).
        namespace: Prefix-store namespace (distinct per model and tokenizer).
        store_rules: Boundary rules for the prefix store; None = the store is not used.
        special_prefix: Tokens the post-processor puts before the text when special tokens
            are added; None = unknown, such requests are always tokenized in full.
        special_suffix: Tokens it puts after the text (meaningful with `special_prefix`).
    """

    model: str
    source: str
    namespace: bytes
    store_rules: BoundaryRules | None
    special_prefix: list[int] | None
    special_suffix: list[int]

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of `text`, with or without the post-processor's special tokens."""
        ...

    def encode_words(self, text: str) -> tuple[list[int], WordSpans]:
        """Token ids of `text` without special tokens, and their pre-tokenizer words."""
        ...

    def render_chat(self, messages: Sequence[Mapping[str, Any]], **options: Any) -> str:
        """`messages` rendered with the chat template, as vLLM renders them."""
        ...


def _component_types(node: Any, key: str) -> list[dict[str, Any]]:
    if node is None:
        return []
    if node.get("type") == "Sequence":
        out: list[dict[str, Any]] = []
        for child in node.get(key, []):
            out += _component_types(child, key)
        return out
    return [node]


def _store_support(data: Mapping[str, Any], lookahead: int) -> str | None:
    """Why the prefix store cannot be used with this tokenizer.json (None = it can)."""
    model = data.get("model") or {}
    if model.get("dropout"):
        return "BPE dropout makes tokenization random"
    if data.get("pre_tokenizer") is None:
        return "no pre-tokenizer: the whole text is one BPE word"
    for norm in _component_types(data.get("normalizer"), "normalizers"):
        kind = norm.get("type")
        if kind not in _LOCAL_NORMALIZERS:
            return f"normalizer {kind} is not known to be local"
        if kind == "Replace":
            pattern = norm.get("pattern") or {}
            if "String" not in pattern or len(pattern["String"]) > lookahead:
                return "a regex Replace normalizer may read arbitrarily far ahead"
    splitting = False
    for pre in _component_types(data.get("pre_tokenizer"), "pretokenizers"):
        kind = pre.get("type")
        if kind not in _LOCAL_PRE_TOKENIZERS:
            return f"pre-tokenizer {kind} is not known to be local"
        if kind == "ByteLevel":
            splitting = splitting or bool(pre.get("use_regex", True))
        elif kind == "Metaspace":
            splitting = splitting or bool(pre.get("split", True))
        else:
            splitting = True
    if not splitting:
        return "the pre-tokenizer does not split the text: it is one BPE word"
    return None


#: Normalizers that act on each character (or a bounded, boundary-safe run) the same wherever
#: the string starts: a text tokenized from a cut on is normalized as it is inside the text.
_STITCH_NORMALIZERS = frozenset(
    {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "StripAccents", "Replace", "BertNormalizer"}
)
#: Pre-tokenizers that split a string from its start as they split it from any word boundary
#: (FixedLength's grid is not known to restart at a word boundary).
_STITCH_PRE_TOKENIZERS = _LOCAL_PRE_TOKENIZERS - {"FixedLength"}
#: Regex constructs that read before the match position or anchor at the string's start.
_LOOKS_BACK = re.compile(r"\\[bBAGK]|\(\?<[=!]|(?<![\[\\])\^")


def _stitch_blocker(data: Mapping[str, Any]) -> str | None:
    """Why a tail tokenized on its own could differ from the fresh tokenization's tail
    (None = it cannot): the start of a string must not be special."""
    for norm in _component_types(data.get("normalizer"), "normalizers"):
        kind = norm.get("type")
        if kind not in _STITCH_NORMALIZERS:
            return f"normalizer {kind} treats the start of a string differently"
        if kind == "Replace" and len((norm.get("pattern") or {}).get("String", "")) != 1:
            return "a Replace normalizer of several characters may span a cut"
    for pre in _component_types(data.get("pre_tokenizer"), "pretokenizers"):
        kind = pre.get("type")
        if kind not in _STITCH_PRE_TOKENIZERS:
            return f"pre-tokenizer {kind} is not known to split a string like its tail"
        if kind == "ByteLevel" and pre.get("add_prefix_space"):
            return "ByteLevel adds a prefix space to a string"
        if kind == "Metaspace":
            scheme = pre.get("prepend_scheme")
            if scheme is None:
                scheme = "always" if pre.get("add_prefix_space", True) else "never"
            if scheme != "never":
                return "Metaspace prepends to a string"
        if kind == "Split":
            regex = (pre.get("pattern") or {}).get("Regex")
            if regex is not None and _LOOKS_BACK.search(regex):
                return "a split regex looks behind or anchors at the start"
    for tok in data.get("added_tokens") or ():
        if tok.get("single_word"):
            return "a single-word added token reads the character before it"
        if tok.get("rstrip"):
            return "an added token swallows the whitespace after it"
    return None


def _split_special(
    with_special: Sequence[int], plain: Sequence[int]
) -> tuple[list[int], list[int]] | None:
    """``(prefix, suffix)`` such that ``with_special == prefix + plain + suffix``, if any."""
    n, m = len(with_special), len(plain)
    for i in range(n - m + 1):
        if list(with_special[i : i + m]) == list(plain):
            return list(with_special[:i]), list(with_special[i + m :])
    return None


class HFTokenizer:
    """A transformers tokenizer prepared for fast, thread-safe encoding and vLLM-style chat.

    Args:
        model: Model name it serves.
        source: Where it was loaded from.
        hf: The loaded ``transformers`` tokenizer.
        lookahead: `BoundaryRules.lookahead` for the prefix store.
    """

    def __init__(self, model: str, source: str, hf: Any, lookahead: int = 4) -> None:
        self.model = model
        self.source = source
        self.hf = hf
        self.namespace = f"{model}\x00{source}".encode("utf-8", "surrogatepass")
        self.templates = ChatTemplateCache(hf)
        self.store_rules: BoundaryRules | None = None
        self.special_prefix: list[int] | None = None
        self.special_suffix: list[int] = []
        self.store_reason = ""
        #: Why a partial store hit tokenizes the whole text, not only the rest ("" = it doesn't).
        self.stitch_reason = "the prefix store is not used"
        self._lock = threading.Lock()
        self._raw: Any = None
        self._full: Any = None
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            self.store_reason = "not a fast (Rust) tokenizer: no offsets"
            return
        from tokenizers import Tokenizer

        serialized = backend.to_str()
        raw = Tokenizer.from_str(serialized)
        raw.no_truncation()
        raw.no_padding()
        # No post-processor: no special tokens, and untrimmed offsets for the prefix store.
        raw.post_processor = None
        specials = [t for t in getattr(hf, "all_special_tokens", ()) if isinstance(t, str)]
        # A special token inside text catches transformers-side options such as
        # split_special_tokens that the Rust tokenizer alone would not apply.
        probes = _PROBES + tuple(f"x{t} y{t}" for t in specials[:2])
        if any(list(hf.encode(p, add_special_tokens=False)) != self._ids(raw, p) for p in probes):
            self.store_reason = "the Rust tokenizer disagrees with transformers"
            logger.warning("%s: %s; encoding through transformers", model, self.store_reason)
            return
        self._raw = raw
        split = [
            _split_special(list(hf.encode(p, add_special_tokens=True)), self._ids(raw, p))
            for p in probes
        ]
        if split[0] is not None and all(s == split[0] for s in split):
            self.special_prefix, self.special_suffix = split[0]
        else:
            full = Tokenizer.from_str(serialized)
            full.no_truncation()
            full.no_padding()
            self._full = full
        data = json.loads(serialized)
        reason = _store_support(data, lookahead)
        if reason is not None:
            self.store_reason = reason
            return
        margin = 0
        for tok in data.get("added_tokens") or ():
            content = str(tok.get("content", ""))
            margin = max(margin, len(unicodedata.normalize("NFKD", content)) + 1)
        self.stitch_reason = _stitch_blocker(data) or ""
        self.store_rules = BoundaryRules(
            lookahead=lookahead,
            added_token_margin=margin,
            normalizer=data.get("normalizer") is not None,
            stitch=not self.stitch_reason,
        )

    @staticmethod
    def _ids(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[
            0
        ].ids
        return ids

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of `text` as ``tokenizer.encode(text, add_special_tokens=...)`` gives them."""
        if self._raw is None:
            with self._lock:
                return list(self.hf.encode(text, add_special_tokens=add_special_tokens))
        if add_special_tokens and self._full is not None:
            return self._ids(self._full, text, True)
        ids = self._ids(self._raw, text)
        if add_special_tokens and self.special_prefix is not None:
            return self.special_prefix + ids + self.special_suffix
        return ids

    def encode_words(self, text: str) -> tuple[list[int], WordSpans]:
        """Token ids of `text` without special tokens, and their pre-tokenizer words.

        Raises:
            RuntimeError: The tokenizer is not a fast one (no offsets).
        """
        if self._raw is None:
            raise RuntimeError(f"{self.model}: {self.store_reason}")
        enc = self._raw.encode_batch([text], add_special_tokens=False)[0]
        ids: list[int] = enc.ids
        return ids, EncodingWords(enc)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], **options: Any) -> str:
        """`messages` rendered with the chat template (see `chat.render_chat`)."""
        return render_chat(self.hf, self.templates, messages, **options)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.model!r}, source={self.source!r})"


@dataclass(frozen=True, slots=True)
class _Miss:
    message: str
    until: float


def discover_tokenizers(root: str | os.PathLike[str], file_name: str) -> dict[str, Path]:
    """Model name -> tokenizer directory for every `file_name` found under `root`.

    ``<root>/.../models--org--name/snapshots/<rev>/<file_name>`` names ``org/name`` (the
    revision ``refs/main`` points at wins, else the newest); ``<root>/org/name/<file_name>``
    names ``org/name``. Hidden directories are skipped and the walk is bounded in depth.

    Args:
        root: Directory to search.
        file_name: File that marks a tokenizer directory (``tokenizer.json``).

    Returns:
        Model name -> directory (empty when `root` does not exist).
    """
    base = Path(root).expanduser()
    found: dict[str, tuple[int, float, Path]] = {}
    if not base.is_dir():
        return {}
    visited = 0
    for dirpath, dirnames, filenames in os.walk(base):
        rel = Path(dirpath).relative_to(base)
        depth = len(rel.parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        visited += 1
        if depth >= _MAX_DISCOVERY_DEPTH or visited > _MAX_DISCOVERY_DIRS:
            dirnames[:] = []
        if file_name not in filenames or depth == 0:
            continue
        parts = rel.parts
        name: str | None = None
        rank = 0
        cache_at = next((i for i, p in enumerate(parts) if _HF_CACHE_DIR.match(p)), None)
        if cache_at is not None:
            m = _HF_CACHE_DIR.match(parts[cache_at])
            if m is None or len(parts) != cache_at + 3 or parts[cache_at + 1] != "snapshots":
                continue
            name = m.group(1).replace("--", "/")
            try:
                main = (base.joinpath(*parts[: cache_at + 1]) / "refs" / "main").read_text()
                rank = 1 if main.strip() == parts[cache_at + 2] else 0
            except OSError:
                rank = 0
        else:
            name = "/".join(parts)
        try:
            mtime = (Path(dirpath) / file_name).stat().st_mtime
        except OSError:
            continue
        prev = found.get(name)
        if prev is None or (rank, mtime) > (prev[0], prev[1]):
            found[name] = (rank, mtime, Path(dirpath))
    if visited > _MAX_DISCOVERY_DIRS:
        logger.warning("tokenizer discovery under %s stopped after %d directories", base, visited)
    return {name: entry[2] for name, entry in found.items()}


class TokenizerRegistry:
    """Finds and caches each model's tokenizer (thread-safe, bounded LRU).

    Args:
        config: Sources (``local``, ``hf``) and the cache bound (``maxCachedTokenizers``).
        metrics: Counts loads by result when given.
        loader: Builds a backend from ``(model, source, transformers tokenizer)``; the default
            is `HFTokenizer`.
    """

    def __init__(
        self,
        config: TokenizersPoolConfig | None = None,
        *,
        metrics: Metrics | None = None,
        loader: Callable[[str, str, Any], TokenizerBackend] | None = None,
    ) -> None:
        self.config = config if config is not None else TokenizersPoolConfig()
        self.metrics = metrics
        self._loader = loader or HFTokenizer
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, TokenizerBackend] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}
        self._misses: dict[str, _Miss] = {}
        # Models already warned about (bounded like the misses; the oldest forgotten first).
        self._warned: OrderedDict[str, None] = OrderedDict()
        self._discovered: dict[str, Path] = {}
        self._discovered_at = float("-inf")

    # -- public ------------------------------------------------------------------------------

    def get(self, model: str) -> TokenizerBackend:
        """The tokenizer of `model`, loaded on first use.

        Raises:
            TokenizerNotFoundError: No source has it; the message lists every place searched.
        """
        with self._lock:
            tok = self._cache.get(model)
            if tok is not None:
                self._cache.move_to_end(model)
                return tok
            miss = self._misses.get(model)
            if miss is not None and time.monotonic() < miss.until:
                raise TokenizerNotFoundError(miss.message)
            load_lock = self._loading.setdefault(model, threading.Lock())
        with load_lock:
            with self._lock:
                tok = self._cache.get(model)
                if tok is not None:
                    return tok
                # A thread that queued behind a failed load takes its answer, not a new try.
                miss = self._misses.get(model)
                if miss is not None and time.monotonic() < miss.until:
                    raise TokenizerNotFoundError(miss.message)
            try:
                tok = self._load(model)
            except TokenizerNotFoundError as exc:
                with self._lock:
                    self._remember_miss(model, str(exc))
                    self._loading.pop(model, None)
                    first = model not in self._warned
                    self._warned[model] = None
                    while len(self._warned) > _MAX_MISSES:
                        self._warned.popitem(last=False)
                self._count("not_found")
                if first:
                    logger.warning(
                        "%s; text prompts and chat for this model are scored 0 until a "
                        "tokenizer is configured (tokenizersPoolConfig.local.modelTokenizerMap or "
                        "autoDiscoveryDir, or tokenizersPoolConfig.hf.enabled); "
                        "logged once per model",
                        exc,
                    )
                raise
            with self._lock:
                self._cache[model] = tok
                self._misses.pop(model, None)
                self._loading.pop(model, None)
                while len(self._cache) > self.config.max_cached_tokenizers:
                    evicted, _ = self._cache.popitem(last=False)
                    logger.debug("tokenizer of %s evicted from the cache", evicted)
            self._count("loaded")
            logger.info("loaded tokenizer of %s from %s", model, tok.source)
            return tok

    def cached_models(self) -> list[str]:
        """Models whose tokenizer is loaded, least recently used first."""
        with self._lock:
            return list(self._cache)

    def discovered(self, refresh: bool = False) -> dict[str, Path]:
        """Model -> directory found under ``autoDiscoveryDir`` (rescanned when stale or asked)."""
        root = self.config.local.auto_discovery_dir
        if not root:
            return {}
        now = time.monotonic()
        with self._lock:
            fresh = now - self._discovered_at < self._refresh_seconds()
            if fresh and not refresh:
                return dict(self._discovered)
        found = discover_tokenizers(root, self.config.local.auto_discovery_tokenizer_file_name)
        with self._lock:
            self._discovered = found
            self._discovered_at = now
        return dict(found)

    def clear(self) -> None:
        """Drop every loaded tokenizer and remembered miss."""
        with self._lock:
            self._cache.clear()
            self._misses.clear()
            self._discovered_at = float("-inf")

    # -- loading -----------------------------------------------------------------------------

    def _remember_miss(self, model: str, message: str) -> None:
        """Memo a failed load (caller holds the lock); bounded, the oldest go first."""
        now = time.monotonic()
        self._misses.pop(model, None)
        self._misses[model] = _Miss(message, now + self._refresh_seconds())
        if len(self._misses) > _MAX_MISSES:
            for name in [n for n, m in self._misses.items() if m.until <= now]:
                del self._misses[name]
            while len(self._misses) > _MAX_MISSES:
                del self._misses[next(iter(self._misses))]

    def _refresh_seconds(self) -> float:
        return self.config.local.auto_discovery_refresh_seconds

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.tokenizer_loads.labels(result).inc()

    def _load(self, model: str) -> TokenizerBackend:
        if missing_extras(["tokenizers"]):
            what = f"no tokenizer for model {model!r}: loading one"
            raise TokenizerNotFoundError(missing_extras_message(what, ["tokenizers"]))
        searched: list[str] = []
        tok = self._load_mapped(model, searched)
        if tok is None:
            tok = self._load_discovered(model, searched)
        if tok is not None:
            return tok
        if model == BUILTIN_TOKENIZER_MODEL:
            return self._from_path(model, builtin_tokenizer())
        tok = self._load_from_hub(model, searched)
        if tok is not None:
            return tok
        raise TokenizerNotFoundError(
            f"no tokenizer for model {model!r}; searched: " + "; ".join(searched)
        )

    def _load_mapped(self, model: str, searched: list[str]) -> TokenizerBackend | None:
        """The tokenizer `modelTokenizerMap` names for `model`, or None (why appended)."""
        mapped = self.config.local.model_tokenizer_map.get(model)
        if mapped is None:
            searched.append("modelTokenizerMap: no entry")
            return None
        path = Path(mapped).expanduser()
        if not path.exists():
            searched.append(f"modelTokenizerMap: {path} does not exist")
            return None
        try:
            return self._from_path(model, path)
        except Exception as exc:  # any loader failure is reported, never raised raw
            searched.append(f"modelTokenizerMap: {path} failed to load ({exc})")
            logger.warning("tokenizer of %s at %s failed to load: %s", model, path, exc)
            return None

    def _load_discovered(self, model: str, searched: list[str]) -> TokenizerBackend | None:
        """The tokenizer found for `model` under `autoDiscoveryDir`, or None (why appended)."""
        local = self.config.local
        if not local.auto_discovery_dir:
            searched.append("autoDiscoveryDir: not set")
            return None
        root = Path(local.auto_discovery_dir).expanduser()
        found = self.discovered()
        if model not in found:
            found = self.discovered(refresh=True)
        if model in found:
            try:
                return self._from_path(model, found[model])
            except Exception as exc:
                searched.append(f"autoDiscoveryDir: {found[model]} failed to load ({exc})")
                logger.warning("tokenizer of %s failed to load: %s", model, exc)
        elif not root.is_dir():
            searched.append(f"autoDiscoveryDir: {root} is not a directory")
        else:
            searched.append(
                f"autoDiscoveryDir: no {local.auto_discovery_tokenizer_file_name} in "
                f"{root}/{model}/ or "
                f"{root}/**/models--{model.replace('/', '--')}/snapshots/<rev>/ "
                f"({len(found)} other model(s) found)"
            )
        return None

    def _load_from_hub(self, model: str, searched: list[str]) -> TokenizerBackend | None:
        """The tokenizer from the Hugging Face hub (or its cache), or None (why appended)."""
        hf = self.config.hf
        if not hf.enabled:
            searched.append("Hugging Face hub: disabled (tokenizersPoolConfig.hf.enabled=false)")
            return None
        offline = hub_offline()
        cache = hf.tokenizers_cache_dir or "the default Hugging Face cache"
        try:
            return self._from_hub(model, offline)
        except Exception as exc:
            where = (
                f"Hugging Face cache {cache} only (HF_HUB_OFFLINE is set)"
                if offline
                else (f"Hugging Face hub (cache {cache})")
            )
            searched.append(f"{where}: {type(exc).__name__}: {exc}")
            return None

    def _from_path(self, model: str, path: Path) -> TokenizerBackend:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if path.is_file():
            if path.name == "tokenizer.json" and (path.parent / "tokenizer_config.json").exists():
                hf = AutoTokenizer.from_pretrained(str(path.parent), local_files_only=True)
            else:
                fast: Any = PreTrainedTokenizerFast
                hf = fast(tokenizer_file=str(path))
        else:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return self._loader(model, str(path), hf)

    def _from_hub(self, model: str, offline: bool) -> TokenizerBackend:
        from transformers import AutoTokenizer

        hf_cfg = self.config.hf
        kwargs: dict[str, Any] = {"cache_dir": hf_cfg.tokenizers_cache_dir}
        if hf_cfg.token:
            kwargs["token"] = hf_cfg.token
        if offline:
            kwargs["local_files_only"] = True
        # Never run code from the hub inside the scheduler.
        hf = AutoTokenizer.from_pretrained(model, trust_remote_code=False, **kwargs)
        return self._loader(model, f"hub:{model}", hf)
