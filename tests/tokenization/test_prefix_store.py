"""The prefix store: cached tokens always lead a fresh tokenization; LRU, ratio and chat keys."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

from kvaware_scorer.config import PrefixStoreConfig, TokenizersPoolConfig
from kvaware_scorer.metrics import Metrics
from kvaware_scorer.tokenization import (
    BoundaryRules,
    EncodingWords,
    HFTokenizer,
    PrefixStore,
    TokenizationService,
    Words,
    safe_token_counts,
)
from tests.tokenization.conftest import CHATML_MODEL, LLAMA_MODEL, MODELS

# Fragments chosen to hit every way text after a boundary can reach back before it: special
# tokens and their pieces, whitespace and newline runs, contractions, digit groups,
# punctuation runs, combining marks and Hangul jamo (NFC), compatibility characters (NFKC),
# zero-width and non-breaking spaces, emoji and CJK.
FRAGMENTS = [
    *"abcxyz AEIO",
    "  ",
    "\n",
    "\r\n",
    "\t",
    "\n\n",
    "   \n",
    "'s",
    "'ll",
    "'re",
    "'",
    "123",
    "4567",
    "!",
    "?!",
    "...",
    "<",
    "|",
    ">",
    "<|im_start|>",
    "<|im_end|>",
    "<|im_sta",
    "rt|>",
    "<tool_call>",
    "<|begin_of_text|>",
    "é",
    "e\u0301",
    "\u0301",
    "\u0323",
    "가",
    "\u1100",
    "\u1161",
    "\u11a8",
    "日本",
    "😀",
    "\u200b",
    "\u00a0",
    "\u3000",
    "ﬁ",
    "ﾞ",
    "ｶ",
    "\u0b47",
    "\u0b3e",
    "İ",
    "ß",
    "\u2028",
    "hello",
    " world",
    "café",
    " the cache",
]
texts = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=3)), min_size=1, max_size=70
).map("".join)
BLOCK_SIZES = (8, 13, 32)


def _services(root: Path, ratio: float) -> dict[int, TokenizationService]:
    return {
        bs: TokenizationService(
            TokenizersPoolConfig.model_validate(
                {"minPrefixOverlapRatio": ratio, "local": {"autoDiscoveryDir": str(root)}}
            ),
            PrefixStoreConfig(block_size=bs),
        )
        for bs in BLOCK_SIZES
    }


@pytest.fixture(scope="module")
def services(tokenizer_root: Path) -> Iterator[dict[int, TokenizationService]]:
    """One service per chunk length, using the store for any cached prefix (ratio 0)."""
    made = _services(tokenizer_root, 0.0)
    yield made
    for svc in made.values():
        svc.close()


@pytest.fixture(scope="module")
def stitching(tokenizer_root: Path) -> Iterator[dict[int, TokenizationService]]:
    """One service per chunk length that never answers with a cached prefix alone (ratio 1):
    every partial hit tokenizes the rest and stitches it to the cached tokens."""
    made = _services(tokenizer_root, 1.0)
    yield made
    for svc in made.values():
        svc.close()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    a=texts,
    suffix=texts,
    cut=st.integers(0, 400),
    repeat=st.booleans(),
    bs=st.sampled_from(BLOCK_SIZES),
    model=st.sampled_from(MODELS),
    add_special=st.booleans(),
)
def test_store_tokens_lead_a_fresh_tokenization(
    services: dict[int, TokenizationService],
    hf_tokenizers: dict[str, Any],
    a: str,
    suffix: str,
    cut: int,
    repeat: bool,
    bs: int,
    model: str,
    add_special: bool,
) -> None:
    """Tokens from the store equal the leading tokens of tokenizing the new text from scratch."""
    svc = services[bs]
    svc.store.clear()
    hf = hf_tokenizers[model]
    first = svc.tokenize_request(model, prompt=a, add_special_tokens=add_special)
    assert first.token_ids == hf.encode(a, add_special_tokens=add_special)
    b = (a + a if repeat else a[: min(cut, len(a))]) + suffix
    note(f"a={a!r}\nb={b!r}")
    fresh = hf.encode(b, add_special_tokens=add_special)
    got = svc.tokenize_request(model, prompt=b, add_special_tokens=add_special)
    if got.source == "prefix_store":
        assert not got.complete and 0 < got.covered_chars <= len(b)
        assert got.token_ids == fresh[: len(got.token_ids)]
    else:
        assert got.token_ids == fresh
    # Every cached prefix level, not only the longest one, must lead the fresh tokenization.
    tok = svc.registry.get(model)
    plain = hf.encode(b, add_special_tokens=False)
    keys = svc.store.chunk_keys(tok.namespace, b)
    for k in range(1, len(keys) + 1):
        hit = svc.store.lookup(keys[:k])
        assert hit.tokens == plain[: len(hit.tokens)]
        if hit.chunks < k:
            break


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    a=texts,
    more=st.lists(st.tuples(st.integers(0, 400), texts), min_size=1, max_size=3),
    bs=st.sampled_from(BLOCK_SIZES),
    model=st.sampled_from(MODELS),
    add_special=st.booleans(),
)
# NFC composes "e" and a combining acute into one character whose tokens end after the "e":
# the cut must not leave the mark to start the tail.
@example(
    a="e\u0301<|im_start|><tool_call>", more=[(24, "a")], bs=8, model=LLAMA_MODEL, add_special=False
)
def test_stitched_tails_equal_a_fresh_tokenization(
    stitching: dict[int, TokenizationService],
    hf_tokenizers: dict[str, Any],
    a: str,
    more: list[tuple[int, str]],
    bs: int,
    model: str,
    add_special: bool,
) -> None:
    """Cached tokens plus the rest tokenized on its own are exactly the fresh tokenization,
    and the chunks learned from a stitched result are as safe as those of a full one: each
    text keeps some of the previous one (cut anywhere, even inside a word, a whitespace run
    or a special token) and adds more, so later texts hit chunks learned from stitches."""
    svc = stitching[bs]
    svc.store.clear()
    hf = hf_tokenizers[model]
    text = a
    stitched = 0
    for step, (cut, suffix) in enumerate([(len(a), ""), *more]):
        text = text[: min(cut, len(text))] + suffix
        note(f"step {step}: {text!r}")
        got = svc.tokenize_request(model, prompt=text, add_special_tokens=add_special)
        assert got.complete and got.source in ("stitched", "tokenizer")
        assert got.token_ids == hf.encode(text, add_special_tokens=add_special)
        stitched += got.source == "stitched"
    # Every cached level still leads the fresh tokenization of the last text.
    tok = svc.registry.get(model)
    plain = hf.encode(text, add_special_tokens=False)
    keys = svc.store.chunk_keys(tok.namespace, text)
    hit = svc.store.lookup(keys)
    assert hit.tokens == plain[: len(hit.tokens)]


def test_a_growing_conversation_tokenizes_only_its_new_text(
    make_service: Callable[..., TokenizationService], hf_tokenizers: dict[str, Any]
) -> None:
    """Each turn below the ratio tokenizes the text after the cached tokens, not the whole
    chat: the tokenizer sees a few turns' worth of characters, and every result is exact."""
    for model in MODELS:
        svc = make_service(ratio=0.9, block_size=64)
        hf = hf_tokenizers[model]
        tok = svc.registry.get(model)
        seen: list[int] = []
        encode_words = tok.encode_words

        def counting(text: str, _inner: Any = encode_words, _seen: list[int] = seen) -> Any:
            _seen.append(len(text))
            return _inner(text)

        tok.encode_words = counting  # type: ignore[method-assign]
        chat = [{"role": "system", "content": _long_text(300, "sys")}]
        sources = []
        for turn in range(12):
            chat.append({"role": "user", "content": _long_text(40, f"q{turn}")})
            got = svc.tokenize_request(model, messages=chat)
            text = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            fresh = hf.encode(text, add_special_tokens=False)
            assert got.token_ids == fresh[: len(got.token_ids)]
            assert not got.complete or got.token_ids == fresh
            sources.append(got.source)
            chat.append({"role": "assistant", "content": _long_text(40, f"a{turn}")})
        assert sources[0] == "tokenizer" and "tokenizer" not in sources[1:]
        assert sources.count("stitched") >= 4 and "prefix_store" in sources
        # The first text in full, then only tails: far less than a whole chat per stitch.
        assert seen[0] == len(
            hf.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
        )
        assert max(seen[1:]) < seen[0] < len(text)


@settings(max_examples=150, deadline=None)
@given(a=texts, suffix=texts, bs=st.sampled_from(BLOCK_SIZES), model=st.sampled_from(MODELS))
def test_safe_counts_depend_only_on_the_prefix(
    services: dict[int, TokenizationService], a: str, suffix: str, bs: int, model: str
) -> None:
    """Safe counts of the chunks of a text do not change when more text follows it."""
    tok = services[bs].registry.get(model)
    rules = tok.store_rules
    assert rules is not None
    ids_a, words_a = tok.encode_words(a)
    _, words_b = tok.encode_words(a + suffix)
    counts_a, cuts_a = safe_token_counts(a, words_a, bs, rules)
    counts_b, cuts_b = safe_token_counts(a + suffix, words_b, bs, rules)
    assert counts_b[: len(counts_a)] == counts_a and cuts_b[: len(cuts_a)] == cuts_a
    assert counts_a == sorted(counts_a) and all(c <= len(ids_a) for c in counts_a)
    assert all(cut <= (k + 1) * bs for k, cut in enumerate(cuts_a))


def _long_text(n_words: int, seed: str) -> str:
    words = ["cache", "block", "prefix", "token", "pod", "score", "router", seed]
    return " ".join(words[(i * 7 + len(seed)) % len(words)] for i in range(n_words)) + "."


def test_ratio_decides_between_store_and_tokenizer(
    make_service: Callable[..., TokenizationService], hf_tokenizers: dict[str, Any]
) -> None:
    """A cached prefix below minPrefixOverlapRatio means a full tokenization, above it a hit."""
    metrics = Metrics()
    svc = make_service(ratio=0.8, block_size=64)
    svc.metrics = metrics
    base = _long_text(400, "alpha")
    svc.tokenize(CHATML_MODEL, prompt=base)
    half = base[: len(base) // 2] + _long_text(200, "omega")
    low = svc.tokenize_request(CHATML_MODEL, prompt=half)
    assert low.source == "stitched" and low.complete
    assert low.token_ids == hf_tokenizers[CHATML_MODEL].encode(half)
    most = base[: int(len(base) * 0.95)] + " and a new question?"
    high = svc.tokenize_request(CHATML_MODEL, prompt=most)
    assert high.source == "prefix_store" and high.covered_chars >= 0.8 * len(most)
    assert high.token_ids == hf_tokenizers[CHATML_MODEL].encode(most)[: len(high.token_ids)]
    fresh = svc.tokenize_request(CHATML_MODEL, prompt=_long_text(300, "zeta"))
    assert fresh.source == "tokenizer"
    lookups = metrics.prefix_store_lookups
    assert lookups.labels("partial")._value.get() == 1
    assert lookups.labels("hit")._value.get() == 1
    assert lookups.labels("miss")._value.get() == 2
    assert metrics.prefix_store_entries._value.get() == len(svc.store)
    hist = metrics.tokenization_latency
    assert hist.labels("prefix_store")._sum.get() > 0 and hist.labels("tokenizer")._sum.get() > 0
    assert hist.labels("stitched")._sum.get() > 0


def test_ratio_one_always_completes_and_zero_capacity_never_uses_the_store(
    make_service: Callable[..., TokenizationService], hf_tokenizers: dict[str, Any]
) -> None:
    """With ratio 1.0 every result is the whole tokenization (a repeat stitches the uncached
    end to the cached tokens); with cacheSize 0 every request is tokenized in full."""
    text = _long_text(300, "beta")
    fresh = hf_tokenizers[CHATML_MODEL].encode(text)
    whole = make_service(ratio=1.0)
    got = [whole.tokenize_request(CHATML_MODEL, prompt=text) for _ in range(2)]
    assert [g.source for g in got] == ["tokenizer", "stitched"]
    assert all(g.complete and g.token_ids == fresh for g in got)
    none = make_service(cache_size=0)
    for _ in range(2):
        assert none.tokenize_request(CHATML_MODEL, prompt=text).source == "tokenizer"
    assert len(none.store) == 0


def test_completion_hit_keeps_the_bos(
    make_service: Callable[..., TokenizationService], hf_tokenizers: dict[str, Any]
) -> None:
    """A store hit for a prompt with special tokens starts with the post-processor's bos."""
    svc = make_service(ratio=0.5, block_size=32)
    hf = hf_tokenizers[LLAMA_MODEL]
    text = _long_text(200, "gamma")
    svc.tokenize(LLAMA_MODEL, prompt=text)
    got = svc.tokenize_request(LLAMA_MODEL, prompt=text + " more")
    assert got.source == "prefix_store"
    assert got.token_ids[0] == hf.bos_token_id
    assert got.token_ids == hf.encode(text + " more")[: len(got.token_ids)]
    plain = svc.tokenize_request(LLAMA_MODEL, prompt=text, add_special_tokens=False)
    assert plain.source == "prefix_store" and plain.token_ids == got.token_ids[1:]


@pytest.mark.parametrize("model", MODELS)
def test_chat_is_keyed_on_the_rendered_text(
    make_service: Callable[..., TokenizationService], hf_tokenizers: dict[str, Any], model: str
) -> None:
    """Chats sharing a long system prompt hit the store on the rendered template text."""
    svc = make_service(ratio=0.6, block_size=64)
    hf = hf_tokenizers[model]
    system = {"role": "system", "content": _long_text(500, "delta")}
    first = [system, {"role": "user", "content": "What is cached?"}]
    second = [system, {"role": "user", "content": "Which pod holds it?"}]
    assert svc.tokenize(model, messages=first) == hf.apply_chat_template(
        first, tokenize=True, return_dict=False, add_generation_prompt=True
    )
    got = svc.tokenize_request(model, messages=second)
    assert got.source == "prefix_store" and got.text == svc.render_chat(model, second)
    full = hf.apply_chat_template(
        second, tokenize=True, return_dict=False, add_generation_prompt=True
    )
    assert got.token_ids == full[: len(got.token_ids)]
    assert (got.token_ids[0] == hf.bos_token_id) == (model == LLAMA_MODEL)
    # The same text as a completion prompt (specials added) does not reuse chat's bos handling.
    completion = svc.tokenize_request(model, prompt=got.text)
    assert completion.token_ids == hf.encode(got.text)[: len(completion.token_ids)]


def test_lru_evicts_chains_from_their_tail(tokenizer_root: Path) -> None:
    """Beyond cacheSize the deepest chunks go first, so the shared root stays usable."""
    svc = TokenizationService(
        TokenizersPoolConfig.model_validate(
            {"minPrefixOverlapRatio": 0.0, "local": {"autoDiscoveryDir": str(tokenizer_root)}}
        ),
        PrefixStoreConfig(block_size=16, cache_size=5),
    )
    text = _long_text(40, "eps")
    tok = svc.registry.get(CHATML_MODEL)
    keys = svc.store.chunk_keys(tok.namespace, text)
    assert len(keys) > 8
    svc.tokenize(CHATML_MODEL, prompt=text)
    assert len(svc.store) == 5
    assert svc.store.lookup(keys).chunks == 5
    stats = svc.store.stats()
    assert stats.evictions == len(keys) - 5 and stats.capacity == 5 and stats.block_size == 16
    svc.close()


def test_store_insert_validates_lengths() -> None:
    """insert refuses counts and cuts that do not cover the keys from `start` on."""
    store = PrefixStore(PrefixStoreConfig(block_size=8))
    with pytest.raises(ValueError, match="from start on"):
        store.insert([1, 2], [1], [1, 2], [5])
    with pytest.raises(ValueError, match="from start on"):
        store.insert([1, 2], [1, 2], [1, 2], [5, 6], start=1)
    with pytest.raises(ValueError, match="within the keys"):
        store.insert([1, 2], [], [], [5], start=3)
    assert store.insert([1, 2], [1, 2], [3, 6], [5, 6]) == 2
    # Chunks before `start` are only refreshed; the first new one starts at `base`.
    assert store.insert([1, 2, 3], [4], [9], [5, 6, 7, 8], start=2, base=2) == 1
    assert store.lookup([1, 2, 3]).tokens == [5, 6, 7, 8]
    assert store.lookup([1, 2, 3]).covered_chars == 9


def test_stitching_needs_a_tokenizer_that_splits_a_string_like_its_tail() -> None:
    """A prefix space, a Metaspace prepend, a Prepend normalizer, a look-behind split regex or
    a whitespace-swallowing added token each disable stitching, with a reason; the store
    itself stays usable, and a partial hit then tokenizes the whole text."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

    vocab = {c: i for i, c in enumerate("abc \u2581")}

    def made(pre: Any, norm: Any = None, added: Any = None) -> HFTokenizer:
        t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        t.pre_tokenizer = pre
        if norm is not None:
            t.normalizer = norm
        if added is not None:
            t.add_special_tokens([added])
        return _wrapped(t)

    blocked = {
        "prefix space": made(pre_tokenizers.ByteLevel(add_prefix_space=True)),
        "prepends": made(pre_tokenizers.Metaspace(prepend_scheme="first")),
        "Prepend": made(pre_tokenizers.Whitespace(), normalizers.Prepend("\u2581")),
        "looks behind": made(pre_tokenizers.Split(Regex(r"(?<=a)b"), "isolated")),
        "anchors": made(pre_tokenizers.Split(Regex(r"^ab|c"), "isolated")),
        "swallows": made(pre_tokenizers.Whitespace(), added=AddedToken("<x>", rstrip=True)),
        "several characters": made(pre_tokenizers.Whitespace(), normalizers.Replace("ab", "c")),
    }
    for words, tok in blocked.items():
        assert words in tok.stitch_reason, (words, tok.stitch_reason)
        assert tok.store_rules is not None and not tok.store_rules.stitch
    fine = [
        made(pre_tokenizers.ByteLevel(add_prefix_space=False)),
        made(pre_tokenizers.Metaspace(prepend_scheme="never")),
        made(pre_tokenizers.Split(Regex(r"[^\s]+|\s+(?!\S)"), "isolated")),
        made(pre_tokenizers.Whitespace(), normalizers.NFC()),
    ]
    for tok in fine:
        assert tok.stitch_reason == "" and tok.store_rules is not None and tok.store_rules.stitch


def test_a_prefix_space_tokenizer_is_not_stitched(tmp_path: Path) -> None:
    """With a prefix space added at a string's start, the tail on its own would tokenize
    differently: a partial hit is tokenized in full, and the result is exact."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.train_from_iterator(
        [_long_text(200, "zeta")],
        trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    svc = TokenizationService(
        TokenizersPoolConfig.model_validate(
            {
                "minPrefixOverlapRatio": 1.0,
                "local": {"modelTokenizerMap": {"m": str(tmp_path / "tokenizer.json")}},
            }
        ),
        PrefixStoreConfig(block_size=16),
    )
    text = _long_text(100, "zeta")
    first = svc.tokenize_request("m", prompt=text)
    again = svc.tokenize_request("m", prompt=text + " more text")
    assert first.source == again.source == "tokenizer"
    assert again.token_ids == tok.encode(text + " more text").ids
    # What stitching would give at the word end before the final ".": the tail alone gets a
    # prefix space it does not have in the text.
    cut = len(text) - 1
    naive = tok.encode(text[:cut]).ids + tok.encode(text[cut:]).ids
    assert naive != tok.encode(text).ids
    svc.close()


def test_words_group_tokens_by_word_id() -> None:
    """Tokens sharing a word id form one word; a token without one is a word of its own."""
    words = Words.from_encoding(
        [0, 0, 1, None, None, 2], [(0, 2), (2, 4), (4, 5), (5, 9), (9, 12), (12, 13)]
    )
    assert list(words.token_ends) == [2, 3, 4, 5, 6]
    assert list(words.char_ends) == [4, 5, 9, 12, 13]
    assert list(Words.from_encoding([], []).token_ends) == []


def test_boundary_limit_backs_off_spaces_marks_and_margin() -> None:
    """The limit steps back over the added-token margin, trailing spaces and composable marks."""
    plain = BoundaryRules(lookahead=0)
    assert plain.limit("abc   ", 6) == 3
    assert BoundaryRules(lookahead=2).limit("abcdef", 6) == 4
    assert BoundaryRules(lookahead=0, added_token_margin=3).limit("abcdef", 6) == 3
    norm = BoundaryRules(lookahead=0, normalizer=True)
    assert norm.limit("abce\u0301\u0323", 6) == 3  # the marks and the starter they follow
    assert norm.limit("ab\u1100\u1161", 4) == 1


def _wrapped(tokenizer: Any) -> HFTokenizer:
    from transformers import PreTrainedTokenizerFast

    return HFTokenizer("m", "test", PreTrainedTokenizerFast(tokenizer_object=tokenizer))


def test_tokenizers_without_a_safe_boundary_skip_the_store() -> None:
    """No pre-tokenizer, BPE dropout or a regex normalizer disables the store, with a reason."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    vocab = {c: i for i, c in enumerate("abc ")}
    no_pre = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    dropout = Tokenizer(models.BPE(vocab=vocab, merges=[], dropout=0.5))
    dropout.pre_tokenizer = pre_tokenizers.Whitespace()
    regex = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    regex.pre_tokenizer = pre_tokenizers.Whitespace()
    regex.normalizer = normalizers.Replace(Regex("a+"), "a")
    no_split = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    no_split.pre_tokenizer = pre_tokenizers.ByteLevel(use_regex=False)
    ok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    ok.pre_tokenizer = pre_tokenizers.Whitespace()
    reasons = {
        name: _wrapped(t)
        for name, t in [("pre", no_pre), ("drop", dropout), ("re", regex), ("one", no_split)]
    }
    assert "no pre-tokenizer" in reasons["pre"].store_reason
    assert "dropout" in reasons["drop"].store_reason
    assert "regex Replace" in reasons["re"].store_reason
    assert "does not split" in reasons["one"].store_reason
    assert all(t.store_rules is None for t in reasons.values())
    good = _wrapped(ok)
    assert good.store_rules == BoundaryRules(
        lookahead=4, added_token_margin=0, normalizer=False, stitch=True
    )
    assert good.special_prefix == [] and good.encode("ab c", True) == [0, 1, 2]


def test_service_without_store_support_still_tokenizes(tmp_path: Path) -> None:
    """A tokenizer the store cannot serve is tokenized in full every time."""
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate("abc ")}, merges=[]))
    tok.save(str(tmp_path / "tokenizer.json"))
    svc = TokenizationService(
        TokenizersPoolConfig.model_validate(
            {"local": {"modelTokenizerMap": {"m": str(tmp_path / "tokenizer.json")}}}
        ),
        PrefixStoreConfig(block_size=8),
    )
    text = "abc " * 40
    for _ in range(2):
        got = svc.tokenize_request("m", prompt=text)
        assert got.source == "tokenizer" and len(got.token_ids) == len(text)
    assert len(svc.store) == 0
    svc.close()


def test_unencodable_text_is_a_value_error(
    make_service: Callable[..., TokenizationService],
) -> None:
    """Text with lone surrogates is refused with ValueError, with and without the store."""
    svc = make_service(block_size=8)
    for text in ("ab\ud800", "abcdefgh" * 4 + "\udfff"):
        with pytest.raises(ValueError, match="cannot be tokenized"):
            svc.tokenize(CHATML_MODEL, prompt=text)


@settings(max_examples=80, deadline=None)
@given(text=texts, model=st.sampled_from(MODELS))
def test_lazy_word_spans_agree_with_full_offsets(
    services: dict[int, TokenizationService], text: str, model: str
) -> None:
    """EncodingWords answers like the word lists built from every token's offsets."""
    tok = services[8].registry.get(model)
    assert isinstance(tok, HFTokenizer)
    enc = tok._raw.encode_batch([text], add_special_tokens=False)[0]
    full = Words.from_encoding(enc.word_ids, enc.offsets)
    lazy = EncodingWords(enc)
    for pos in range(len(text) + 1):
        assert lazy.tokens_before(pos) == full.tokens_before(pos), pos
    assert EncodingWords(enc).tokens_before(len(text)) == full.tokens_before(len(text))


def test_lazy_word_spans_handle_removed_characters() -> None:
    """Characters a normalizer removes belong to no token; lazy spans still answer exactly."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["ab", "cd", "e", "[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Replace("x", "")
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    text = "ab xxx cd e ab"
    enc = tok.encode(text)
    full = Words.from_encoding(enc.word_ids, enc.offsets)
    lazy = EncodingWords(enc)
    answers = [lazy.tokens_before(p) for p in range(len(text) + 1)]
    assert answers == [full.tokens_before(p) for p in range(len(text) + 1)]
    assert answers[len(text)] == (4, len(text))
