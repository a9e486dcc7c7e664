"""Block keys: vLLM's golden hash vectors, derived-key chaining and namespace isolation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvaware_scorer.errors import ConfigError, KeyDerivationError
from kvaware_scorer.keys import DerivedKeyer, VllmKeyer, engine_hash_from_wire, make_keyer, u64

VECTORS = Path(__file__).resolve().parent / "fixtures" / "vllm-kv-events" / "hash_vectors.json"


def _cases() -> list[dict[str, Any]]:
    data = json.loads(VECTORS.read_text())
    return [c for c in data["cases"] if c.get("reproducible")]


@pytest.mark.parametrize(
    "case", _cases(), ids=lambda c: f"{c['algo']}-seed{c['PYTHONHASHSEED']}-{c['variant']}"
)
def test_golden_hash_vectors(case: dict[str, Any]) -> None:
    """Every reproducible golden vector is reproduced bit for bit (digest and event int)."""
    tokens = json.loads(VECTORS.read_text())["input_token_ids"]
    lora = case["lora"]
    keyer = VllmKeyer(
        16,
        case["algo"],
        case["PYTHONHASHSEED"],
        {lora["lora_name"]: lora["lora_path"]} if lora else None,
    )
    assert keyer.none_hash.hex() == case["none_hash_hex"]
    digests = keyer.digests(tokens, lora["lora_name"] if lora else None, case["cache_salt"])
    assert len(digests) == len(case["blocks"]) == len(tokens) // 16
    for got, want in zip(digests, case["blocks"], strict=True):
        assert got.hex() == want["digest_hex"]
        assert u64(got) == want["event_int"]
    keys = keyer.block_keys(
        tokens, "any-model", lora["lora_name"] if lora else None, case["cache_salt"]
    )
    assert keys == [b["event_int"] for b in case["blocks"]]


def test_all_reproducible_vectors_covered() -> None:
    """The fixture holds 20 reproducible cases over four algorithms."""
    cases = _cases()
    assert len(cases) == 20
    assert {c["algo"] for c in cases} == {"sha256", "sha256_cbor", "xxhash", "xxhash_cbor"}


def test_vllm_xxhash_without_seed_is_refused() -> None:
    """xxhash without PYTHONHASHSEED is random per vLLM process, so it cannot be reproduced."""
    with pytest.raises(ConfigError, match="hashSeed"):
        VllmKeyer(16, "xxhash", None)


def test_vllm_lora_without_path_is_an_error() -> None:
    """vLLM hashes the adapter path; without it the keyer says so instead of guessing."""
    with pytest.raises(KeyDerivationError, match="loraAdapters"):
        VllmKeyer(16).block_keys(list(range(32)), "m", lora_name="unknown")


def test_partial_trailing_block_never_keyed() -> None:
    """Only full blocks are keyed; a prompt under one block has no keys."""
    k = DerivedKeyer(16)
    assert len(k.block_keys(list(range(69)), "m")) == 4
    assert k.block_keys(list(range(15)), "m") == []
    assert k.block_keys(list(range(64)), "m") == k.block_keys(list(range(64)) + [1, 2, 3], "m")


def test_derived_keys_chain_prefixes() -> None:
    """Equal prefixes share keys; a change in block i changes keys i and later only."""
    k = DerivedKeyer(16)
    a = list(range(160))
    b = list(a)
    b[40] = 99_999
    ka, kb = k.block_keys(a, "m"), k.block_keys(b, "m")
    assert ka[:2] == kb[:2]
    assert all(x != y for x, y in zip(ka[2:], kb[2:], strict=True))


def test_derived_namespaces_isolated() -> None:
    """Different models, LoRA adapters, salts and seeds never share keys."""
    toks = list(range(64))
    base = DerivedKeyer(16)
    variants = {
        "model": base.block_keys(toks, "m"),
        "model2": base.block_keys(toks, "m2"),
        "lora": base.block_keys(toks, "m", lora_name="a"),
        "lora2": base.block_keys(toks, "m", lora_name="b"),
        "salt": base.block_keys(toks, "m", cache_salt="t1"),
        "salt2": base.block_keys(toks, "m", cache_salt="t2"),
        "seed": DerivedKeyer(16, "42").block_keys(toks, "m"),
    }
    all_keys = [k for ks in variants.values() for k in ks]
    assert len(set(all_keys)) == len(all_keys)


def test_lora_keys_do_not_depend_on_base_model() -> None:
    """Keys of a LoRA request are namespaced by the adapter, as upstream does."""
    toks = list(range(64))
    k = DerivedKeyer(16)
    assert k.block_keys(toks, "base-a", lora_name="x") == k.block_keys(
        toks, "base-b", lora_name="x"
    )


def test_derived_chain_matches_block_keys() -> None:
    """Chaining from a block's key continues the same sequence (how events are keyed)."""
    k = DerivedKeyer(16)
    toks = list(range(96))
    full = k.block_keys(toks, "m")
    cont = k.chain(full[1], toks[32:])
    assert cont == full[2:]


def test_derived_rechunk_granularity() -> None:
    """Keys at block size 16 are the same whether computed at once or per 64-token chunk."""
    k = DerivedKeyer(16)
    toks = list(range(256))
    parent = k.root("m")
    chained: list[int] = []
    for off in range(0, 256, 64):
        chained += k.chain(parent, toks[off : off + 64])
        parent = chained[-1]
    assert chained == k.block_keys(toks, "m")


def test_token_ids_out_of_range() -> None:
    """Negative or over-wide token ids are a clear error."""
    with pytest.raises(KeyDerivationError):
        DerivedKeyer(16).block_keys([-1] * 16, "m")


@given(st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=200), st.integers(1, 64))
@settings(max_examples=100, deadline=None)
def test_derived_keys_are_u64_and_deterministic(tokens: list[int], bs: int) -> None:
    """Keys are unsigned 64-bit, one per full block, and deterministic."""
    k1, k2 = DerivedKeyer(bs), DerivedKeyer(bs)
    keys = k1.block_keys(tokens, "m")
    assert keys == k2.block_keys(tokens, "m")
    assert len(keys) == len(tokens) // bs
    assert all(0 <= x < 2**64 for x in keys)


def test_engine_hash_from_wire() -> None:
    """Wire hashes normalize to the low 64 bits (ints) or the digest's last 8 bytes (bytes)."""
    assert engine_hash_from_wire(2**64 - 1) == 2**64 - 1
    assert (
        engine_hash_from_wire(bytes.fromhex("ab" * 24 + "0102030405060708")) == 0x0102030405060708
    )
    assert engine_hash_from_wire(b"\x01\x02") == 0x0102
    for bad in (-1, b"", "x", True, 1.5):
        with pytest.raises(ValueError):
            engine_hash_from_wire(bad)  # type: ignore[arg-type]


def test_make_keyer_unknown_mode() -> None:
    """An unknown key mode names the config key and the valid choices."""
    with pytest.raises(ConfigError, match="keyMode"):
        make_keyer("fnv")


#: vLLM before 0.31 (bare extra keys), LoRA "sql-lora" plus cache_salt "tenant-a", seed unset,
#: the fixture's input tokens: event ints of the 4 full blocks, computed from the procedure
#: H((parent, tuple(block tokens), ("sql-lora", "tenant-a") on block 0 else ("sql-lora",))).
PRE_031_LORA_SALT = {
    "sha256": [0x516796A4739FBCEC, 0x07C3C673674869AF, 0xC8143181FF0981FA, 0x410577177A31C56F],
    "sha256_cbor": [0x75CC985E604400FB, 0x5B399DB12EBA5E3B, 0x5E2FDAFE5FAF1E8B, 0x85FD02BA0102E9C7],
}


@pytest.mark.parametrize("algo", sorted(PRE_031_LORA_SALT))
def test_pre_031_generation_golden_vectors(algo: str) -> None:
    """The pre-0.31 generation hashes the bare LoRA name and salt (no adapter path needed)."""
    tokens = json.loads(VECTORS.read_text())["input_token_ids"]
    keyer = make_keyer("vllm", 16, "", algo, None, "pre-0.31")
    keys = keyer.block_keys(tokens, "any-model", "sql-lora", "tenant-a")
    assert keys == PRE_031_LORA_SALT[algo]
    newest = make_keyer("vllm", 16, "", algo, {"sql-lora": "/adapters/sql"})
    assert newest.block_keys(tokens, "any-model", "sql-lora", "tenant-a")[0] != keys[0]


def test_generations_agree_without_extra_keys() -> None:
    """Without LoRA or salt both generations give the same keys (extra keys are None)."""
    tokens = list(range(64))
    old = VllmKeyer(16, generation="pre-0.31").block_keys(tokens, "m")
    assert old == VllmKeyer(16).block_keys(tokens, "m")


def test_generation_is_validated_and_configurable() -> None:
    """An unknown generation is a ConfigError; the indexer config selects the generation."""
    from kvaware_scorer import Indexer

    with pytest.raises(ConfigError, match="generation"):
        VllmKeyer(16, generation="0.7")
    tp = {"keyMode": "vllm", "vllmHashGeneration": "pre-0.31"}
    indexer = Indexer({"tokenProcessorConfig": tp})
    assert isinstance(indexer.keyer, VllmKeyer) and indexer.keyer.generation == "pre-0.31"
    assert Indexer({"tokenProcessorConfig": {"keyMode": "vllm"}}).keyer.generation == "0.31"
