"""The tokenizer registry: sources in order, discovery layouts, errors, caching, threads."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kvaware_scorer.config import TokenizersPoolConfig
from kvaware_scorer.errors import TokenizerNotFoundError
from kvaware_scorer.metrics import Metrics
from kvaware_scorer.tokenization import (
    HFTokenizer,
    TokenizerBackend,
    TokenizerRegistry,
    build_tokenizer,
    discover_tokenizers,
    hub_offline,
)
from tests.tokenization.conftest import CHATML_MODEL, LLAMA_MODEL


def _registry(**cfg: Any) -> TokenizerRegistry:
    return TokenizerRegistry(TokenizersPoolConfig.model_validate(cfg))


def _hf_cache_layout(root: Path, repo: str, revs: dict[str, int], main: str | None) -> Path:
    """Write ``models--org--name/snapshots/<rev>/`` dirs (vocab size per rev) and refs/main."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    for rev, vocab in revs.items():
        snapshot = build_tokenizer(repo_dir / "snapshots" / rev, vocab_size=vocab)
        # Hub repos carry a model config; transformers reads it before the tokenizer's.
        (snapshot / "config.json").write_text('{"model_type": "gpt2"}')
    if main is not None:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(main)
    return repo_dir


def test_explicit_map_accepts_directory_and_file(tokenizer_root: Path, tmp_path: Path) -> None:
    """modelTokenizerMap entries may name a tokenizer directory or a bare tokenizer.json."""
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tokenizer_root / CHATML_MODEL / "tokenizer.json", bare / "tokenizer.json")
    reg = _registry(
        local={
            "modelTokenizerMap": {
                "served-name": str(tokenizer_root / CHATML_MODEL),
                "bare": str(bare / "tokenizer.json"),
            }
        }
    )
    a, b = reg.get("served-name"), reg.get("bare")
    assert isinstance(a, TokenizerBackend) and a.source == str(tokenizer_root / CHATML_MODEL)
    assert a.encode("hello cache world", False) == b.encode("hello cache world", False)
    with pytest.raises(ValueError, match="no chat template"):
        b.render_chat([{"role": "user", "content": "x"}])


def test_nested_discovery_names_models_by_relative_path(tokenizer_root: Path) -> None:
    """org/name/tokenizer.json under the discovery root is the tokenizer of org/name."""
    found = discover_tokenizers(tokenizer_root, "tokenizer.json")
    assert found[CHATML_MODEL] == tokenizer_root / CHATML_MODEL
    assert found[LLAMA_MODEL] == tokenizer_root / LLAMA_MODEL
    reg = _registry(local={"autoDiscoveryDir": str(tokenizer_root)})
    assert reg.get(LLAMA_MODEL).source == str(tokenizer_root / LLAMA_MODEL)


def test_hf_cache_layout_prefers_the_main_revision(tmp_path: Path) -> None:
    """models--org--name/snapshots/<rev> is org/name, the revision refs/main names wins."""
    hub = tmp_path / "cache" / "hub"
    repo = _hf_cache_layout(hub, "org/cached-model", {"aaa": 600, "bbb": 700}, main="aaa")
    _hf_cache_layout(hub, "solo", {"r1": 600}, main=None)
    (repo / "snapshots" / "bbb" / "tokenizer.json").touch()  # newer, but not main
    found = discover_tokenizers(tmp_path / "cache", "tokenizer.json")
    assert found["org/cached-model"] == repo / "snapshots" / "aaa"
    assert "solo" in found
    assert not any(name.startswith("hub/") or "snapshots" in name for name in found)
    (repo / "refs" / "main").unlink()
    found = discover_tokenizers(tmp_path / "cache", "tokenizer.json")
    assert found["org/cached-model"] == repo / "snapshots" / "bbb"


def test_discovery_skips_hidden_dirs_and_honours_the_file_name(tmp_path: Path) -> None:
    """Hidden directories are not searched and only the configured marker file counts."""
    build_tokenizer(tmp_path / ".hidden" / "m")
    build_tokenizer(tmp_path / "org" / "m")
    assert set(discover_tokenizers(tmp_path, "tokenizer.json")) == {"org/m"}
    assert set(discover_tokenizers(tmp_path, "tokenizer_config.json")) == {"org/m"}
    assert discover_tokenizers(tmp_path, "vocab.txt") == {}
    assert discover_tokenizers(tmp_path / "missing", "tokenizer.json") == {}


def test_missing_model_error_names_every_place_searched(tmp_path: Path) -> None:
    """A model found nowhere raises TokenizerNotFoundError naming map, directory and hub."""
    build_tokenizer(tmp_path / "org" / "other")
    metrics = Metrics()
    reg = TokenizerRegistry(
        TokenizersPoolConfig.model_validate(
            {
                "local": {
                    "modelTokenizerMap": {"x/y": str(tmp_path / "nowhere")},
                    "autoDiscoveryDir": str(tmp_path),
                }
            }
        ),
        metrics=metrics,
    )
    with pytest.raises(TokenizerNotFoundError) as info:
        reg.get("x/y")
    msg = str(info.value)
    assert "'x/y'" in msg
    assert f"modelTokenizerMap: {tmp_path / 'nowhere'} does not exist" in msg
    assert f"no tokenizer.json in {tmp_path}/x/y/" in msg and "models--x--y" in msg
    assert "1 other model(s) found" in msg
    assert "hub: disabled" in msg
    assert isinstance(info.value, LookupError)
    assert metrics.tokenizer_loads.labels("not_found")._value.get() == 1
    with pytest.raises(TokenizerNotFoundError, match="autoDiscoveryDir: not set"):
        _registry().get("x/y")


def test_broken_map_entry_falls_back_to_discovery(tokenizer_root: Path, tmp_path: Path) -> None:
    """A mapped path that fails to load is reported, and the next source is still tried."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    reg = _registry(
        local={
            "modelTokenizerMap": {CHATML_MODEL: str(broken)},
            "autoDiscoveryDir": str(tokenizer_root),
        }
    )
    assert reg.get(CHATML_MODEL).source == str(tokenizer_root / CHATML_MODEL)
    reg = _registry(local={"modelTokenizerMap": {"m": str(broken)}})
    with pytest.raises(TokenizerNotFoundError, match="failed to load"):
        reg.get("m")


def test_hub_offline_reads_only_the_local_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With HF_HUB_OFFLINE set, an enabled hub loads from tokenizersCacheDir without network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline()
    cache = tmp_path / "hf"
    _hf_cache_layout(cache, "org/hub-model", {"abc123": 650}, main="abc123")
    reg = _registry(hf={"enabled": True, "tokenizersCacheDir": str(cache)})
    tok = reg.get("org/hub-model")
    assert tok.source == "hub:org/hub-model"
    assert tok.encode("hello", False)
    with pytest.raises(TokenizerNotFoundError, match="HF_HUB_OFFLINE is set"):
        reg.get("org/not-cached")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not hub_offline()


def test_loaded_tokenizers_are_cached_in_a_bounded_lru(tokenizer_root: Path) -> None:
    """A second get returns the same object; beyond maxCachedTokenizers the oldest is dropped."""
    reg = _registry(maxCachedTokenizers=1, local={"autoDiscoveryDir": str(tokenizer_root)})
    first = reg.get(CHATML_MODEL)
    assert reg.get(CHATML_MODEL) is first
    reg.get(LLAMA_MODEL)
    assert reg.cached_models() == [LLAMA_MODEL]
    assert reg.get(CHATML_MODEL) is not first


def test_concurrent_gets_load_once(tokenizer_root: Path) -> None:
    """Threads asking for the same model at once share one load."""
    loads: list[str] = []
    lock = threading.Lock()

    def loader(model: str, source: str, hf: Any) -> TokenizerBackend:
        with lock:
            loads.append(model)
        return HFTokenizer(model, source, hf)

    reg = TokenizerRegistry(
        TokenizersPoolConfig.model_validate({"local": {"autoDiscoveryDir": str(tokenizer_root)}}),
        loader=loader,
    )
    barrier = threading.Barrier(8)
    got: list[TokenizerBackend] = []

    def worker() -> None:
        barrier.wait()
        got.append(reg.get(CHATML_MODEL))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert loads == [CHATML_MODEL]
    assert len(got) == 8 and all(g is got[0] for g in got)


def test_concurrent_gets_of_a_failing_model_try_once(tokenizer_root: Path) -> None:
    """Threads asking at once for a model whose tokenizer fails to load share one attempt."""
    attempts: list[str] = []
    lock = threading.Lock()

    def loader(model: str, source: str, hf: Any) -> TokenizerBackend:
        with lock:
            attempts.append(model)
        time.sleep(0.3)  # the others queue up behind this load
        raise OSError("corrupt tokenizer")

    reg = TokenizerRegistry(
        TokenizersPoolConfig.model_validate({"local": {"autoDiscoveryDir": str(tokenizer_root)}}),
        loader=loader,
    )
    barrier = threading.Barrier(8)
    errors: list[str] = []

    def worker() -> None:
        barrier.wait()
        try:
            reg.get(CHATML_MODEL)
        except TokenizerNotFoundError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert attempts == [CHATML_MODEL]
    assert len(errors) == 8 and all("corrupt tokenizer" in e for e in errors)


def test_remembered_misses_are_bounded(tmp_path: Path) -> None:
    """Requests for ever new unknown models do not grow the miss memo without bound."""
    reg = _registry(local={"autoDiscoveryDir": str(tmp_path), "autoDiscoveryRefreshSeconds": 3600})
    for i in range(3000):
        with pytest.raises(TokenizerNotFoundError):
            reg.get(f"org/unknown-{i}")
    assert len(reg._misses) <= 1024
    with pytest.raises(TokenizerNotFoundError):
        reg.get("org/unknown-2999")  # the latest ones are still remembered


def test_misses_are_remembered_until_the_refresh_interval(tmp_path: Path) -> None:
    """A missing model fails fast until autoDiscoveryRefreshSeconds pass; then it is found."""
    slow = _registry(local={"autoDiscoveryDir": str(tmp_path), "autoDiscoveryRefreshSeconds": 3600})
    eager = _registry(local={"autoDiscoveryDir": str(tmp_path), "autoDiscoveryRefreshSeconds": 0})
    for reg in (slow, eager):
        with pytest.raises(TokenizerNotFoundError):
            reg.get("org/late")
    build_tokenizer(tmp_path / "org" / "late")
    with pytest.raises(TokenizerNotFoundError):
        slow.get("org/late")
    assert eager.get("org/late").model == "org/late"
    slow.clear()
    assert slow.get("org/late").model == "org/late"


def test_transformers_side_options_are_honoured(tokenizer_root: Path) -> None:
    """A tokenizer loaded with split_special_tokens encodes like transformers, store disabled."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(
        str(tokenizer_root / CHATML_MODEL), split_special_tokens=True
    )
    tok = HFTokenizer(CHATML_MODEL, "split", hf)
    text = "<|im_start|>user hi"
    assert tok.encode(text, False) == hf.encode(text, add_special_tokens=False)
    assert len(tok.encode(text, False)) > 3
    assert tok.store_rules is None and "disagrees with transformers" in tok.store_reason
