"""The Indexer facade: config loading, scoring end to end over the in-memory index."""

from __future__ import annotations

import asyncio

import pytest

from kvaware_scorer import ConfigError, Indexer, IndexerConfig

A, B = "10.0.0.1:8000", "10.0.0.2:8000"


def test_default_config_is_embedded_memory() -> None:
    """The default indexer uses the in-memory backend with block size 16 and derived keys."""
    ix = Indexer(IndexerConfig())
    assert ix.index.stats().backend == "memory"
    assert ix.block_size == 16
    assert ix.keyer.mode == "derived"


def test_upstream_camelcase_config() -> None:
    """The upstream camelCase dict form loads, including tiers and the in-memory bounds."""
    cfg = IndexerConfig.from_dict(
        {
            "tokenProcessorConfig": {
                "blockSize": 64,
                "hashSeed": "42",
                "hashAlgorithm": "sha256_cbor",
                "keyMode": "vllm",
            },
            "kvBlockIndexConfig": {"inMemoryConfig": {"size": 1000, "podCacheSize": 4}},
            "kvCacheBackendConfigs": [
                {"name": "gpu", "weight": 1.0},
                {"name": "cpu", "weight": 0.7},
            ],
        }
    )
    ix = Indexer(cfg)
    assert ix.block_size == 64 and ix.keyer.mode == "vllm"
    assert ix.tiers.weight("cpu") == 0.7
    assert ix.index.stats().capacity == 1000


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"tokenProcessorConfig": {"blockSiz": 16}}, "tokenProcessorConfig.blockSiz"),
        (
            {"kvBlockIndexConfig": {"inMemoryConfig": {"sizee": 1}}},
            "kvBlockIndexConfig.inMemoryConfig.sizee",
        ),
        ({"bogus": 1}, "bogus"),
        (
            {"kvCacheBackendConfigs": [{"name": "gpu", "wieght": 1}]},
            "kvCacheBackendConfigs[0].wieght",
        ),
    ],
)
def test_unknown_keys_name_the_key(data: dict[str, object], path: str) -> None:
    """Unknown keys are errors that name the key's path."""
    with pytest.raises(ConfigError) as info:
        IndexerConfig.from_dict(data)
    assert info.value.path == path


def test_score_longest_prefix() -> None:
    """Scores are the fraction of full prompt blocks held consecutively from block 0."""
    ix = Indexer()
    toks = list(range(16 * 8 + 5))
    keys = ix.block_keys(toks, "m")
    ix.index.add(A, keys[:6])
    ix.index.add(B, keys[:2] + keys[3:])
    assert ix.score("m", toks, [A, B, "x:1"]) == {A: 0.75, B: 0.25, "x:1": 0.0}


def test_score_short_prompt_is_zero() -> None:
    """A prompt shorter than one block scores 0 everywhere."""
    ix = Indexer()
    assert ix.score("m", list(range(10)), [A]) == {A: 0.0}


def test_model_lora_salt_isolation() -> None:
    """Blocks indexed for one model/adapter/salt never match another."""
    ix = Indexer()
    toks = list(range(64))
    ix.index.add(A, ix.block_keys(toks, "m", lora_name="sql", cache_salt="t1"))
    assert ix.score("m", toks, [A], lora_name="sql", cache_salt="t1") == {A: 1.0}
    assert ix.score("m", toks, [A]) == {A: 0.0}
    assert ix.score("m", toks, [A], lora_name="sql") == {A: 0.0}
    assert ix.score("m", toks, [A], lora_name="other", cache_salt="t1") == {A: 0.0}


def test_tier_weights_in_scores() -> None:
    """A pod holding the prompt in CPU scores the CPU weight."""
    ix = Indexer(
        {"kvCacheBackendConfigs": [{"name": "gpu", "weight": 1.0}, {"name": "cpu", "weight": 0.8}]}
    )
    toks = list(range(64))
    ix.index.add(A, ix.block_keys(toks, "m"), tier="CPU")
    assert ix.score("m", toks, [A])[A] == pytest.approx(0.8)


def test_pods_none_scores_known_pods() -> None:
    """With pods=None every pod holding block 0 is scored."""
    ix = Indexer()
    toks = list(range(32))
    ix.index.add(A, ix.block_keys(toks, "m"))
    assert ix.score("m", toks) == {A: 1.0}


def test_prompt_as_token_list_is_used_as_is() -> None:
    """A prompt given as a list of ints is used without tokenizing."""
    ix = Indexer()
    toks = list(range(32))
    ix.index.add(A, ix.block_keys(toks, "m"))
    assert ix.score("m", pods=[A], prompt=toks) == {A: 1.0}


def test_token_lists_are_not_copied() -> None:
    """Token ids given as a list are used as they are (no copy on the score path); other
    sequences become lists."""
    ix = Indexer()
    toks = list(range(32))
    assert ix.tokens("m", token_ids=toks) is toks
    assert ix.tokens("m", prompt=toks) is toks
    assert ix.tokens("m", token_ids=tuple(toks)) == toks
    assert ix.tokens("m", prompt=range(32)) == toks


def test_exactly_one_input() -> None:
    """token_ids, prompt and messages are mutually exclusive."""
    with pytest.raises(ValueError):
        Indexer().score("m", [1], [A], prompt="x")


def test_ascore_matches_score() -> None:
    """The async API returns what the sync one does."""
    ix = Indexer()
    toks = list(range(64))
    ix.index.add(A, ix.block_keys(toks, "m")[:2])
    assert asyncio.run(ix.ascore("m", toks, [A])) == ix.score("m", toks, [A])
    ix.close()


def test_purge_pod_and_metrics() -> None:
    """purge_pod forgets the pod and counts the purge by reason."""
    ix = Indexer()
    toks = list(range(64))
    ix.index.add(A, ix.block_keys(toks, "m"))
    assert ix.purge_pod(A, reason="endpoint_removed") == 4
    assert ix.score("m", toks, [A]) == {A: 0.0}
    val = ix.metrics.registry.get_sample_value(
        "kvaware_purges_total", {"reason": "endpoint_removed"}
    )
    assert val == 1.0


def test_speculative_through_facade() -> None:
    """record_speculative makes a pod score for the request until the TTL ends."""
    ix = Indexer()
    toks = list(range(64))
    ix.record_speculative(A, ix.block_keys(toks, "m"), ttl=10)
    assert ix.score("m", toks, [A]) == {A: 1.0}
