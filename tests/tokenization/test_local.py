"""The offline tokenizer builder: deterministic, loadable by transformers, reusable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvaware_scorer.tokenization import (
    build_tokenizer,
    builtin_corpus,
    chatml_template,
    install_local_tokenizer,
)
from kvaware_scorer.tokenization.local import BOS_TOKEN, CHAT_MARKERS, EOS_TOKEN


def test_builds_are_byte_identical(tmp_path: Path) -> None:
    """Two builds with the same arguments write byte-identical tokenizer files."""
    a = build_tokenizer(tmp_path / "a", vocab_size=1024)
    b = build_tokenizer(tmp_path / "b", vocab_size=1024)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert builtin_corpus() == builtin_corpus()
    assert 4_000 < sum(map(len, builtin_corpus())) < 64_000


def test_loads_with_autotokenizer_and_has_special_tokens(tmp_path: Path) -> None:
    """AutoTokenizer loads the directory, with bos/eos, ChatML markers and the chat template."""
    from transformers import AutoTokenizer

    d = build_tokenizer(tmp_path / "t")
    tok = AutoTokenizer.from_pretrained(str(d))
    assert tok.bos_token == BOS_TOKEN and tok.eos_token == EOS_TOKEN
    for marker in CHAT_MARKERS:
        ids = tok.encode(marker, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [marker]
    assert tok.chat_template == chatml_template()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    sample = "The cache holds 12345 blocks, café!"
    assert tok.decode(tok.encode(sample)) == sample
    assert tok.encode(sample)[0] != tok.convert_tokens_to_ids(BOS_TOKEN)


def test_bos_style_adds_bos_and_template_writes_it(tmp_path: Path) -> None:
    """With add_bos_token the post-processor prepends bos and the template starts with it."""
    from transformers import AutoTokenizer

    d = build_tokenizer(tmp_path / "t", style="split", add_bos_token=True)
    tok = AutoTokenizer.from_pretrained(str(d))
    bos = tok.convert_tokens_to_ids(BOS_TOKEN)
    assert tok.encode("hello world")[0] == bos
    assert tok.encode("hello world", add_special_tokens=False)[0] != bos
    rendered = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert rendered.startswith(BOS_TOKEN + "<|im_start|>user")
    cfg = json.loads((d / "tokenizer.json").read_text())
    assert cfg["normalizer"]["type"] == "NFC"


def test_existing_build_is_reused_and_changes_rebuild(tmp_path: Path) -> None:
    """An identical build is left untouched; different arguments rebuild the directory."""
    d = build_tokenizer(tmp_path / "t", vocab_size=700)
    marker = d / "kvaware-tokenizer.json"
    stamp = marker.stat().st_mtime_ns
    (d / "tokenizer.json").touch()
    build_tokenizer(tmp_path / "t", vocab_size=700)
    assert marker.stat().st_mtime_ns == stamp
    before = (d / "tokenizer.json").read_bytes()
    build_tokenizer(tmp_path / "t", vocab_size=900)
    assert (d / "tokenizer.json").read_bytes() != before


def test_custom_corpus_and_template(tmp_path: Path) -> None:
    """A given corpus and chat template are used instead of the built-in ones."""
    from transformers import AutoTokenizer

    d = build_tokenizer(
        tmp_path / "t",
        vocab_size=400,
        corpus=["zzq zzq zzq zzq"] * 20,
        chat_template="{% for m in messages %}{{ m['content'] }}|{% endfor %}",
    )
    tok = AutoTokenizer.from_pretrained(str(d))
    assert tok.convert_ids_to_tokens(tok.encode("zzq")) == ["zzq"]
    assert tok.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False) == "a|"


def test_install_uses_nested_model_layout(tmp_path: Path) -> None:
    """install_local_tokenizer writes <root>/<org>/<name> and refuses escaping names."""
    d = install_local_tokenizer(tmp_path, "org/model-1")
    assert d == tmp_path / "org" / "model-1"
    assert (d / "tokenizer.json").is_file()
    for bad in ("", "../x", "/abs/x", "a/../../b"):
        with pytest.raises(ValueError):
            install_local_tokenizer(tmp_path, bad)


def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    """A vocabulary smaller than the byte alphabet or an unknown style is a ValueError."""
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(tmp_path / "a", vocab_size=100)
    with pytest.raises(ValueError, match="style"):
        build_tokenizer(tmp_path / "b", style="wordpiece")  # type: ignore[arg-type]
