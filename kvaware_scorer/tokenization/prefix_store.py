"""The prefix store: an LRU of text-chunk hashes -> the tokens that lie wholly inside that prefix.

A text is cut into chunks of ``blockSize`` characters. Chunk ``k`` is keyed by a hash chained
through the chunks of the prefix ``text[:k * blockSize]`` in the tokenizer's namespace, and
holds the tokens added to the prefix's *safe* tokens by that chunk plus the character position
up to which those tokens reach. A later text that shares the
prefix finds the same keys and rebuilds the leading tokens without tokenizing.

Safety is the whole point: cached tokens must ALWAYS equal the leading tokens of a fresh
tokenization of *any* text starting with that prefix. A byte-level BPE tokenizer works in
four steps, and text after the chunk boundary can reach back through each of them:

1. added (special) tokens are matched first; one that straddles the boundary starts at most
   ``len(token)`` characters before it, and can absorb whitespace to its left (``lstrip``);
2. the normalizer (NFC, NFKC, ...) can compose the last characters before the boundary with
   combining marks that follow it;
3. the pre-tokenizer splits the text into words with a regex whose decisions read past a
   word's end: a bounded few characters (letter runs, ``'ll`` contractions) but a whole
   whitespace run (``\\s+(?!\\S)``, ``\\s*[\\r\\n]+``), however long;
4. BPE merges run inside each word, and a merge near the end of a word can change how its
   beginning is split, so a word cut by the boundary is never usable in part.

`safe_token_counts` therefore keeps, for a boundary ``b``, only the tokens of whole words that
end before a limit: ``b`` minus the longest added token, then minus any trailing whitespace,
then (with a normalizer) minus the trailing starter and its combining marks, then minus
`BoundaryRules.lookahead` characters; and a word only counts when a non-space character follows
it before that limit (so the whitespace run after it, which the regex reads to its end, is
known to be over). Words come from the fast tokenizer's word ids and untrimmed character
offsets. The property tests in ``tests/tokenization`` check the guarantee on many generated
texts (unicode, whitespace runs, special tokens, repeated prefixes).

The cached tokens end at a pre-token boundary of the fresh tokenization (their last word's
end, the *cut*). For tokenizers that treat the start of a string like any other position (no
prefix space or ``Metaspace`` prepend, no ``Prepend``/``Strip`` normalizer, no split regex
that looks behind or anchors at the start; `BoundaryRules.stitch`), tokenizing only
``text[cut:]`` gives the fresh tokenization's remaining tokens, so a partial hit costs only
the new text: the cached tokens followed by the tail's are the whole tokenization
(*stitching*), and the tail's chunks are learned from them (`safe_token_counts` with
``start``/``floor``, `PrefixStore.insert` with ``start``/``base``).
"""

from __future__ import annotations

import bisect
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from kvaware_scorer.config import PrefixStoreConfig

__all__ = [
    "BoundaryRules",
    "EncodingWords",
    "PrefixHit",
    "PrefixStore",
    "PrefixStoreStats",
    "StitchedWords",
    "WordSpans",
    "Words",
    "safe_token_counts",
]

# Python's str.isspace() covers every character of the Unicode White_Space property; the
# extra ones are format characters some regex engines (or older Unicode tables) count as space.
_EXTRA_SPACES = frozenset("\u180e\u200b\u2060\ufeff")


def _space_like(ch: str) -> bool:
    # A superset of every regex engine's ``\s``: stripping more than needed only costs cache
    # coverage, stripping less could break the guarantee.
    return ch.isspace() or ch in _EXTRA_SPACES


def _composable(ch: str) -> bool:
    """Whether `ch` can combine with the character before it under NFC/NFKC."""
    o = ord(ch)
    # Hangul jamo and syllables compose although their combining class is 0.
    if 0x1100 <= o <= 0x11FF or 0xAC00 <= o <= 0xD7FF or 0x3130 <= o <= 0x318F:
        return True
    return any(unicodedata.category(c)[0] == "M" for c in unicodedata.normalize("NFKD", ch))


class _BackScan:
    """``back(x)``: the smallest ``y <= x`` with ``pred`` true on all of ``text[y:x]``.

    Queries come with non-decreasing `x`; a scan that runs into the previous query's range
    reuses its answer, so a whole text costs O(len) however long its runs are.
    """

    __slots__ = ("_last_x", "_last_y", "_pred", "_text")

    def __init__(self, text: str, pred: Callable[[str], bool]) -> None:
        self._text = text
        self._pred = pred
        self._last_x = -1
        self._last_y = -1

    def back(self, x: int) -> int:
        text, pred = self._text, self._pred
        memo = x >= self._last_x >= 0
        y = x
        while y > 0 and pred(text[y - 1]):
            if memo and y <= self._last_x:
                y = min(y, self._last_y)
                break
            y -= 1
        self._last_x, self._last_y = x, y
        return y


class _Scans:
    __slots__ = ("composable", "spaces", "spaces_p")

    def __init__(self, text: str) -> None:
        self.spaces = _BackScan(text, _space_like)
        self.composable = _BackScan(text, _composable)
        self.spaces_p = _BackScan(text, _space_like)


@dataclass(frozen=True, slots=True)
class BoundaryRules:
    """How far before a chunk boundary a word must end for its tokens to be cacheable.

    Attributes:
        lookahead: Characters a pre-tokenizer may read past the first non-space character
            after a word to decide where the word ends (contractions need 3).
        added_token_margin: Longest added token in characters, plus one; 0 when there is none.
        normalizer: Whether the tokenizer normalizes (composition can cross the boundary).
        stitch: Whether tokenizing from a cut (a safe word's end) on gives the same tokens
            as the fresh tokenization from there (the start of a string is not special).
    """

    lookahead: int = 4
    added_token_margin: int = 0
    normalizer: bool = False
    stitch: bool = False

    def limit(self, text: str, boundary: int, scans: _Scans | None = None) -> int:
        """Position before which a word's first following non-space char must lie (+lookahead).

        Args:
            text: The text.
            boundary: The chunk boundary (a character position).
            scans: Scan state shared by increasing boundaries of one text (internal).
        """
        sc = scans if scans is not None else _Scans(text)
        x = sc.spaces.back(max(0, boundary - self.added_token_margin))
        if self.normalizer and x > 0:
            x = sc.composable.back(x) - 1  # the starter before the marks may compose too
        return x - self.lookahead

    def stitches_at(self, text: str, cut: int) -> bool:
        """Whether ``text[cut:]`` tokenized on its own gives the fresh tokenization's tokens
        after a safe cut (the end of a cached word).

        NOTE: a normalizer's composition is the one thing a word's end offset hides: "e" and a
        combining acute compose into one character whose token ends after the "e" (the mark
        belongs to no token), so a tail starting with a composable character is not cut there.
        """
        if not self.stitch:
            return False
        return not (self.normalizer and cut < len(text) and _composable(text[cut]))

    def safe_position(self, text: str, boundary: int, scans: _Scans | None = None) -> int:
        """Words ending at or before this position are safe for `boundary` (-1: none is)."""
        sc = scans if scans is not None else _Scans(text)
        lim = self.limit(text, boundary, sc)
        if lim < 0:
            return -1
        # The last non-space character at or before the limit: a word whose end is at or
        # before it has a non-space character after it (its whitespace run is over) in time.
        return sc.spaces_p.back(lim + 1) - 1


@runtime_checkable
class WordSpans(Protocol):
    """A tokenization seen by pre-tokenizer words (what the prefix store needs of it)."""

    def tokens_before(self, pos: int) -> tuple[int, int]:
        """``(count, cut)``: the leading tokens whose words end at or before character `pos`,
        and the character position the last of them ends at (``(0, 0)`` when none)."""
        ...


@dataclass(frozen=True, slots=True)
class Words:
    """A tokenization grouped by pre-tokenizer words, from explicit lists.

    Attributes:
        token_ends: For each word, the index just past its last token.
        char_ends: For each word, the character offset just past its end (non-decreasing).
    """

    token_ends: Sequence[int]
    char_ends: Sequence[int]

    @classmethod
    def from_encoding(
        cls, word_ids: Sequence[int | None], offsets: Sequence[tuple[int, int]]
    ) -> Words:
        """Group tokens by word id (a token without a word id is a word of its own)."""
        token_ends: list[int] = []
        char_ends: list[int] = []
        prev: int | None = -1
        end = 0
        for i, (wid, (_, stop)) in enumerate(zip(word_ids, offsets, strict=True)):
            if wid is None or wid != prev:
                if i:
                    token_ends.append(i)
                    char_ends.append(end)
                prev = wid
            if stop > end:
                end = stop
        if word_ids:
            token_ends.append(len(word_ids))
            char_ends.append(end)
        return cls(token_ends, char_ends)

    def tokens_before(self, pos: int) -> tuple[int, int]:
        """See `WordSpans.tokens_before`."""
        j = bisect.bisect_right(self.char_ends, pos)
        return (self.token_ends[j - 1], self.char_ends[j - 1]) if j else (0, 0)


class EncodingWords:
    """`WordSpans` read lazily from a ``tokenizers.Encoding``: O(log n) calls per chunk.

    Materializing every token's offsets is one long, GIL-holding call on a big prompt (it
    stalls the event loop); this asks the encoding only about the tokens near chunk limits,
    through its O(1) accessors. Token end offsets are non-decreasing in token order, so a
    binary search finds the first token ending after a position; its word's first token is
    where the safe tokens stop. Queries must come with non-decreasing positions (as
    `safe_token_counts` makes them), which bounds the backward word scans to O(n) in all.
    """

    __slots__ = ("_enc", "_first", "_full", "_n", "_pos", "_t", "_word")

    def __init__(self, encoding: Any) -> None:
        self._enc = encoding
        self._n = len(encoding)
        self._full: Words | None = None
        self._pos = -1
        self._t = -1
        self._word: int | None = None
        self._first = 0

    def _end(self, token: int) -> int:
        chars = self._enc.token_to_chars(token)
        if chars is None:
            raise LookupError(token)
        return int(chars[1])

    def tokens_before(self, pos: int) -> tuple[int, int]:
        """See `WordSpans.tokens_before`."""
        if pos < self._pos or self._full is not None:
            return self._materialized().tokens_before(pos)
        try:
            return self._lazy(pos)
        except LookupError:
            return self._materialized().tokens_before(pos)

    def _materialized(self) -> Words:
        if self._full is None:
            self._full = Words.from_encoding(self._enc.word_ids, self._enc.offsets)
        return self._full

    def _lazy(self, pos: int) -> tuple[int, int]:
        enc, n = self._enc, self._n
        lo, hi = max(self._t, 0), n
        while lo < hi:
            mid = (lo + hi) // 2
            if self._end(mid) > pos:
                hi = mid
            else:
                lo = mid + 1
        t = lo
        if t >= n:
            first = n
        else:
            word = enc.token_to_word(t)
            if word is None:
                first = t
            elif word == self._word and self._t >= 0:
                first = self._first
            else:
                # A different word than the last query's starts after that query's token.
                first, floor = t, self._t + 1
                while first > floor and enc.token_to_word(first - 1) == word:
                    first -= 1
            self._t, self._word, self._first = t, word, first
        self._pos = pos
        return (first, self._end(first - 1)) if first else (0, 0)


class StitchedWords:
    """`WordSpans` of a text whose leading `count` tokens (ending at character `cut`) came
    from the store and whose rest is the tokenization `tail` of ``text[cut:]``.

    Positions before `cut` answer the cached level: a chunk boundary past the cached chunks
    has at least those tokens safe (safety only grows with the boundary), which is all
    `safe_token_counts` asks of them when started there.
    """

    __slots__ = ("count", "cut", "tail")

    def __init__(self, count: int, cut: int, tail: WordSpans) -> None:
        self.count = count
        self.cut = cut
        self.tail = tail

    def tokens_before(self, pos: int) -> tuple[int, int]:
        """See `WordSpans.tokens_before`."""
        if pos >= self.cut:
            c, e = self.tail.tokens_before(pos - self.cut)
            if c:
                return self.count + c, self.cut + e
        return self.count, self.cut


def safe_token_counts(
    text: str,
    words: WordSpans,
    block_size: int,
    rules: BoundaryRules,
    start: int = 0,
    floor: tuple[int, int] = (0, 0),
) -> tuple[list[int], list[int]]:
    """For every full chunk boundary of `text`: how many leading tokens are safe to cache.

    Args:
        text: The tokenized text.
        words: Its tokenization seen by word.
        block_size: Chunk length in characters.
        rules: The tokenizer's boundary rules.
        start: Chunks already known (cached): boundaries start at ``(start + 1) * block_size``.
        floor: ``(count, cut)`` of chunk ``start - 1`` (the cached level) when `start` > 0.

    Returns:
        ``(counts, cuts)``: per boundary ``k * block_size`` (k = start + 1, ...), the number
        of safe leading tokens and the character position their last word ends at. Both are
        non-decreasing and depend only on ``text[:k * block_size]``.
    """
    scans = _Scans(text)
    counts: list[int] = []
    cuts: list[int] = []
    count, cut = floor
    for b in range((start + 1) * block_size, len(text) + 1, block_size):
        pos = rules.safe_position(text, b, scans)
        if pos >= 0:
            c, e = words.tokens_before(pos)
            if c > count:
                count, cut = c, e
        counts.append(count)
        cuts.append(cut)
    return counts, cuts


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """The longest cached prefix of a text.

    Attributes:
        chunks: Leading chunks found (0 = nothing cached).
        covered_chars: Characters the cached tokens reach (their last word's end).
        tokens: The cached leading tokens (without special tokens a post-processor adds).
    """

    chunks: int
    covered_chars: int
    tokens: list[int]


@dataclass(frozen=True, slots=True)
class PrefixStoreStats:
    """Counters of a `PrefixStore`."""

    entries: int
    capacity: int
    block_size: int
    hits: int
    misses: int
    evictions: int


class PrefixStore:
    """A thread-safe, bounded LRU of prefix-chunk keys -> the tokens each chunk adds.

    Values are tuples of shared int objects (one per token id, interned in a table), so that
    rebuilding a prompt's tokens is a pointer copy per token and an entry costs 8 bytes per
    token rather than a Python int each.

    Args:
        config: Capacity (``cacheSize`` entries) and chunk length (``blockSize`` chars).
    """

    def __init__(self, config: PrefixStoreConfig | None = None) -> None:
        config = config if config is not None else PrefixStoreConfig()
        self.capacity = config.cache_size
        self.block_size = config.block_size
        self._entries: OrderedDict[int, tuple[int, tuple[int, ...]]] = OrderedDict()
        self._ints: list[int] = []
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    def chunk_keys(self, namespace: bytes, text: str) -> list[int]:
        """The key of every full chunk of `text` (key ``k`` stands for ``text[:(k+1)*blockSize]``).

        Keys chain Python's keyed string hash (SipHash, randomized per process) through the
        chunks: 64 bits, process-local, which is all an in-process cache needs.
        """
        bs = self.block_size
        key = hash(namespace)
        keys: list[int] = []
        for start in range(0, len(text) - bs + 1, bs):
            key = hash((key, text[start : start + bs]))
            keys.append(key)
        return keys

    def lookup(self, keys: Sequence[int]) -> PrefixHit:
        """The longest run of `keys` present from the first, and the tokens it holds."""
        tokens: list[int] = []
        found = 0
        covered = 0
        entries = self._entries
        with self._lock:
            for key in keys:
                value = entries.get(key)
                if value is None:
                    break
                covered = value[0]
                tokens += value[1]
                found += 1
            # Refresh deepest first so that a prefix's first chunks are the most recent: the
            # LRU then evicts chains from their tail, never orphaning a chain at its root.
            for key in reversed(keys[:found]):
                entries.move_to_end(key)
            if found:
                self._hits += 1
            else:
                self._misses += 1
        return PrefixHit(found, covered, tokens)

    def _interned(self, ids: Sequence[int]) -> tuple[int, ...]:
        table = self._ints
        top = max(ids, default=-1)
        if top >= len(table):
            table.extend(range(len(table), top + 1))
        return tuple(map(table.__getitem__, ids))

    def insert(
        self,
        keys: Sequence[int],
        counts: Sequence[int],
        cuts: Sequence[int],
        token_ids: Sequence[int],
        start: int = 0,
        base: int = 0,
    ) -> int:
        """Record the safe tokens of every chunk of a text.

        Args:
            keys: `chunk_keys` of the text.
            counts: Safe leading token counts per chunk from chunk `start` on (from
                `safe_token_counts` with the same `start`).
            cuts: Character reach of those tokens per chunk.
            token_ids: The text's tokens (without post-processor special tokens).
            start: Chunks before it are only refreshed (they were cached when looked up).
            base: Safe token count of chunk ``start - 1`` (0 when `start` is 0).

        Returns:
            Entries written (existing ones are only refreshed).

        Raises:
            ValueError: `counts` and `cuts` do not cover ``keys[start:]``, or a negative
                token id.
        """
        if not 0 <= start <= len(keys):
            raise ValueError("start must lie within the keys")
        if len(keys) - start != len(counts) or len(counts) != len(cuts):
            raise ValueError("counts and cuts must cover the keys from start on")
        if token_ids and min(token_ids) < 0:
            raise ValueError("token ids must be non-negative")
        written = 0
        entries = self._entries
        with self._lock:
            # Deepest first, as in `lookup`: a chain's root ends up the most recently used.
            for k in range(len(keys) - 1, -1, -1):
                key = keys[k]
                if key in entries:
                    entries.move_to_end(key)
                elif k >= start:
                    i = k - start
                    first = counts[i - 1] if i else base
                    entries[key] = (cuts[i], self._interned(token_ids[first : counts[i]]))
                    written += 1
            overflow = len(entries) - self.capacity
            for _ in range(max(0, overflow)):
                entries.popitem(last=False)
            if overflow > 0:
                self._evictions += overflow
        return written

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> PrefixStoreStats:
        """Entries, capacity and hit/miss/eviction counters."""
        with self._lock:
            return PrefixStoreStats(
                len(self._entries),
                self.capacity,
                self.block_size,
                self._hits,
                self._misses,
                self._evictions,
            )
