"""The built-in tokenizer (model ``kvaware/sim``) and the once-per-model missing-tokenizer warning."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from kvaware_scorer import Indexer, IndexerConfig
from kvaware_scorer.config import TokenizersPoolConfig
from kvaware_scorer.resources import BUILTIN_TOKENIZER_MODEL, builtin_tokenizer
from kvaware_scorer.tokenization import TokenizerRegistry, build_tokenizer, builtin_corpus

PROBES = [
    "hello world",
    "The quick brown fox jumps over the lazy dog: 12345!",
    "café naïve 日本語 😀 <|im_start|>user\nhi<|im_end|>",
    *builtin_corpus()[:40],
]


def test_shipped_tokenizer_is_the_builders_default(tmp_path: Path) -> None:
    """The packaged tokenizer is what `build_tokenizer()` makes today: same vocabulary, same
    ids on every probe, same chat template (so a rebuild never changes what pods and router see)."""
    fresh = build_tokenizer(tmp_path / "fresh")
    shipped = builtin_tokenizer()
    a = Tokenizer.from_file(str(shipped / "tokenizer.json"))
    b = Tokenizer.from_file(str(fresh / "tokenizer.json"))
    assert a.get_vocab() == b.get_vocab()
    assert [a.encode(t).ids for t in PROBES] == [b.encode(t).ids for t in PROBES]
    assert (shipped / "tokenizer_config.json").read_text() == (
        fresh / "tokenizer_config.json"
    ).read_text()


def test_registry_finds_the_builtin_model_with_no_configuration() -> None:
    """An empty tokenizer configuration still knows ``kvaware/sim`` (and only that name)."""
    reg = TokenizerRegistry(TokenizersPoolConfig())
    tok = reg.get(BUILTIN_TOKENIZER_MODEL)
    assert tok.source == str(builtin_tokenizer())
    assert tok.encode("hello world", add_special_tokens=False)
    assert "<|im_start|>user" in tok.render_chat([{"role": "user", "content": "hi"}])


def test_score_without_a_tokenizer_warns_once_per_model(caplog: pytest.LogCaptureFixture) -> None:
    """Text and chat scoring for a model with no tokenizer scores zeros and logs one warning per
    model naming the settings to fix, not one per call."""
    indexer = Indexer(IndexerConfig())
    pods = ["10.0.0.1:8000", "10.0.0.2:8000"]
    with caplog.at_level(logging.DEBUG):
        for _ in range(5):
            assert indexer.score("org/a", prompt="some text", pods=pods) == dict.fromkeys(pods, 0.0)
            assert indexer.score(
                "org/a", messages=[{"role": "user", "content": "hi"}], pods=pods
            ) == dict.fromkeys(pods, 0.0)
        for _ in range(3):
            indexer.score("org/b", prompt="other text", pods=pods)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]
    for record, model in zip(warnings, ("org/a", "org/b"), strict=True):
        text = record.getMessage()
        assert f"no tokenizer for model {model!r}" in text
        assert "tokenizersPoolConfig.local.modelTokenizerMap" in text
        assert "autoDiscoveryDir" in text
    assert indexer.score(BUILTIN_TOKENIZER_MODEL, prompt="some text", pods=pods) == dict.fromkeys(
        pods, 0.0
    )
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 2
    indexer.close()


def test_missing_tokenizers_extra_is_named(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the ``tokenizers`` extra, text scoring scores zeros and the one warning names the
    extra to install (not a bare ``No module named 'transformers'``)."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an absent package looks like
    indexer = Indexer(IndexerConfig())
    pods = ["10.0.0.1:8000"]
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert indexer.score(BUILTIN_TOKENIZER_MODEL, prompt="x " * 64, pods=pods) == {
                pods[0]: 0.0
            }
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "pip install 'kvaware-scorer[tokenizers]'" in warnings[0]
    indexer.close()
