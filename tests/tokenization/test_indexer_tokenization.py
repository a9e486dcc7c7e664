"""Text through the Indexer: score(prompt=/messages=), missing tokenizers, a never-blocked loop."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvaware_scorer import Indexer, IndexerConfig
from kvaware_scorer.tokenization import builtin_corpus
from tests.tokenization.conftest import CHATML_MODEL, LLAMA_MODEL

A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"


@pytest.fixture
def indexer(tokenizer_root: Path) -> Iterator[Indexer]:
    """An in-memory indexer that finds the test tokenizers by auto-discovery."""
    cfg = IndexerConfig.from_dict(
        {
            "tokenizersPoolConfig": {
                "workersCount": 2,
                "local": {"autoDiscoveryDir": str(tokenizer_root)},
            },
            "prefixStoreConfig": {"blockSize": 64},
        }
    )
    ix = Indexer(cfg)
    yield ix
    ix.close()


def _prose(seed: int, n_lines: int) -> str:
    lines = builtin_corpus(seed=seed, sentences=n_lines)
    return "\n".join(lines)


@pytest.mark.parametrize("model", [CHATML_MODEL, LLAMA_MODEL])
def test_score_by_prompt_equals_score_by_token_ids(
    indexer: Indexer, hf_tokenizers: dict[str, Any], model: str
) -> None:
    """score(prompt=...) scores the prompt's vLLM tokens: the same as given those ids."""
    prompt = _prose(1, 60)
    ids = hf_tokenizers[model].encode(prompt)
    keys = indexer.block_keys(ids, model)
    indexer.index.add(A, keys)
    indexer.index.add(B, keys[: len(keys) // 2])
    by_ids = indexer.score(model, ids, [A, B, C])
    assert by_ids[A] == 1.0 and 0.4 < by_ids[B] < 0.6 and by_ids[C] == 0.0
    assert indexer.tokens(model, prompt=prompt) == ids
    assert indexer.score(model, prompt=prompt, pods=[A, B, C]) == by_ids
    # Now the prefix store knows the prompt: its leading tokens come back without tokenizing.
    again = indexer.tokens(model, prompt=prompt)
    assert len(again) < len(ids) and again == ids[: len(again)]


def test_score_by_messages_uses_the_chat_template(
    indexer: Indexer, hf_tokenizers: dict[str, Any]
) -> None:
    """score(messages=...) scores the rendered chat's tokens, the ones vLLM computes."""
    messages = [
        {"role": "system", "content": _prose(2, 40)},
        {"role": "user", "content": "Which pod should serve this?"},
    ]
    hf = hf_tokenizers[LLAMA_MODEL]
    ids = hf.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=True
    )
    indexer.index.add(A, indexer.block_keys(ids, LLAMA_MODEL))
    result = indexer.match(LLAMA_MODEL, pods=[A, B], messages=messages)
    assert result.error is None and result.tokens == len(ids)
    assert result.scores() == {A: 1.0, B: 0.0}
    # Only the first message would be a different prompt: the score shows the difference.
    first_only = hf.encode(messages[0]["content"])
    assert indexer.score(LLAMA_MODEL, first_only, [A]) == {A: 0.0}


def test_missing_tokenizer_scores_zero_with_a_counted_reason(indexer: Indexer) -> None:
    """A model without a tokenizer scores 0 everywhere, says where it looked and counts it."""
    result = indexer.match("org/unknown-model", pods=[A, B], prompt="hello " * 100)
    assert result.scores() == {A: 0.0, B: 0.0}
    assert result.error is not None
    assert "org/unknown-model" in result.error
    for place in ("modelTokenizerMap", "autoDiscoveryDir", "hub: disabled"):
        assert place in result.error
    assert indexer.metrics.score_errors.labels("tokenizer")._value.get() == 1
    assert indexer.score("org/unknown-model", prompt="x", pods=[A]) == {A: 0.0}
    assert indexer.metrics.score_errors.labels("tokenizer")._value.get() == 2


def test_bad_chat_input_is_an_error_not_a_zero(indexer: Indexer) -> None:
    """Malformed messages raise ValueError out of score (a bad request, not a backend fault)."""
    with pytest.raises(ValueError, match="string 'role'"):
        indexer.score(CHATML_MODEL, pods=[A], messages=[{"content": "no role"}])


async def test_ascore_keeps_the_event_loop_responsive(
    indexer: Indexer, hf_tokenizers: dict[str, Any]
) -> None:
    """While a long prompt is tokenized by ascore, the loop keeps ticking every few ms."""
    rng = random.Random(7)
    words = " ".join(_prose(3, 200).split())
    parts = words.split(" ")
    # Warm the tokenizer load so that only tokenization is measured.
    await indexer.ascore(CHATML_MODEL, pods=[A], prompt="warm up")
    # A prompt that takes long enough to tokenize on this machine (a fast one needs more words):
    # a sizing prompt is doubled until it takes 0.3 s on the calling thread (at most 16x the
    # first size), then a fresh prompt of that size is measured (the tokenizer caches prefixes).
    n = 50_000
    while True:
        sizing = " ".join(rng.choice(parts) for _ in range(n))
        t0 = time.perf_counter()
        indexer.tokenization.tokenize(CHATML_MODEL, prompt=sizing)
        if time.perf_counter() - t0 >= 0.3 or n >= 800_000:
            break
        n *= 2
    prompt = " ".join(rng.choice(parts) for _ in range(n))
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - t - 0.005)

    tick = asyncio.create_task(ticker())
    t0 = time.perf_counter()
    scores = await indexer.ascore(CHATML_MODEL, pods=[A, B], prompt=prompt)
    elapsed = time.perf_counter() - t0
    done.set()
    await tick
    assert scores == {A: 0.0, B: 0.0}
    assert elapsed > 0.15, "the prompt is too short to show anything"
    assert len(lags) >= 10
    # Shared CI hosts add scheduling noise of their own (a stall of a quarter second was seen
    # on a loaded 2-core machine, out of 0.78 s); relative to the work, the bound still rules
    # out a loop that waits for the tokenizer, which the control below shows as one lag about
    # as long as the whole tokenization.
    assert max(lags) < 0.5 * elapsed, (max(lags), elapsed)
    # Control: the same work done on the loop thread shows up as one long lag.
    lags.clear()
    done.clear()
    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    t0 = time.perf_counter()
    indexer.tokenization.tokenize(CHATML_MODEL, prompt=prompt + " again")
    blocked = time.perf_counter() - t0
    await asyncio.sleep(0.02)
    done.set()
    await tick
    assert max(lags) > 0.5 * blocked


async def test_concurrent_ascore_calls_agree_with_sync_scores(
    indexer: Indexer, hf_tokenizers: dict[str, Any]
) -> None:
    """Many concurrent ascore calls on shared prefixes return the sync scores of their tokens."""
    shared = _prose(4, 40)
    prompts = [shared + f"\nQuestion {i}: " + _prose(10 + i, 3) for i in range(16)]
    for model in (CHATML_MODEL, LLAMA_MODEL):
        ids = hf_tokenizers[model].encode(prompts[0])
        indexer.index.add(A, indexer.block_keys(ids, model))
    calls = [
        indexer.ascore(model, pods=[A, B], prompt=p)
        for p in prompts
        for model in (CHATML_MODEL, LLAMA_MODEL)
    ]
    results = await asyncio.gather(*calls)
    i = 0
    for p in prompts:
        for model in (CHATML_MODEL, LLAMA_MODEL):
            expected = indexer.score(model, hf_tokenizers[model].encode(p), [A, B])
            got = results[i]
            i += 1
            assert got[B] == 0.0
            # A store hit scores the covered leading tokens only; the shared part is held by A.
            assert got[A] >= expected[A] > 0.0


async def test_atokenize_runs_on_the_service_pool(
    indexer: Indexer, hf_tokenizers: dict[str, Any]
) -> None:
    """TokenizationService.atokenize gives the same tokens as tokenize, off the loop."""
    svc = indexer.tokenization
    text = _prose(5, 10)
    got = await asyncio.gather(*(svc.atokenize(CHATML_MODEL, prompt=text) for _ in range(4)))
    assert all(g == hf_tokenizers[CHATML_MODEL].encode(text)[: len(g)] for g in got)
    svc.close()
    with pytest.raises(RuntimeError, match="closed"):
        await svc.atokenize(CHATML_MODEL, prompt=text)
