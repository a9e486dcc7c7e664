"""Tokenization cost for a long prompt: cold, prefix-store hit, and a whole warm score call.

Builds an offline byte-level BPE tokenizer (``kvaware_scorer.tokenization.local``), makes a
prompt of about ``--tokens`` tokens, and times in one process (p50/p99 over ``--iters`` runs):

- ``transformers encode``: ``AutoTokenizer.encode(prompt)``, the reference cost;
- ``cold (no store)``: the service with the prefix store disabled;
- ``cold (store learns)``: the service with an empty store, which tokenizes and learns chunks;
- ``prefix-store hit``: the same long prefix with a new tail, served from the store;
- ``score(prompt) cold``: ``Indexer.score(prompt=..., pods=...)`` end to end, empty store;
- ``score(prompt) warm``: the same call on a warm store;
- ``score(token_ids)``: the same call given token ids (keys + index lookup only);
- ``score(messages) cold/warm``: a chat (the prompt as system message, a new question)
  rendered with the chat template, then scored, with an empty and a warm store.

Then growing conversations (``--sessions`` chats of ``--turns`` turns, each turn adding a user
message and an answer of ``--turn-chars`` characters each, interleaved as a router sees them):
the CPU time of tokenizing every turn's rendered chat (``time.process_time``, so the Rust
tokenizer's threads count) with the store stitching a partial hit's tail, with the store
re-tokenizing the whole text on a partial hit (the behaviour before stitching), and with no
store; every complete result is checked against ``transformers``.

Run: ``python benchmarks/bench_tokenize.py [--tokens 8192] [--iters 200]``;
``--parts conversation`` runs the conversations alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvaware_scorer import Indexer, IndexerConfig
from kvaware_scorer.tokenization import builtin_corpus, install_local_tokenizer

MODEL = "bench/bpe"
PODS = [f"10.0.0.{i}:8000" for i in range(1, 9)]


def _interleaved(
    paths: dict[str, Callable[[int], object]],
    warm_paths: set[str],
    warm_up: Callable[[], object],
    iters: int,
) -> dict[str, list[float]]:
    """Time every path once per round, in turn, so load drift on a shared host hits all alike."""
    out: dict[str, list[float]] = {name: [] for name in paths}
    for name, fn in paths.items():  # first calls load and compile things
        if name in warm_paths:
            warm_up()
        fn(-1)
    for i in range(iters):
        for name, fn in paths.items():
            if name in warm_paths:
                warm_up()  # the previous path may have cleared the store
            t0 = time.perf_counter()
            fn(i)
            out[name].append(time.perf_counter() - t0)
    return out


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    """Run the benchmark and print a table; returns 0."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="prompt length in tokens")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--block-size", type=int, default=256, help="prefix store chunk (chars)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--parts", default="prompt,conversation", help="prompt, conversation")
    ap.add_argument("--sessions", type=int, default=8, help="conversations")
    ap.add_argument("--turns", type=int, default=16, help="turns per conversation")
    ap.add_argument("--turn-chars", type=int, default=600, help="characters per message")
    args = ap.parse_args()
    parts = set(args.parts.split(","))

    root = Path(tempfile.mkdtemp(prefix="bench-tok-"))
    corpus = builtin_corpus(seed=0, sentences=4000)
    t0 = time.perf_counter()
    install_local_tokenizer(root, MODEL, vocab_size=args.vocab, corpus=corpus)
    build_s = time.perf_counter() - t0

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(root / MODEL))
    if "prompt" in parts:
        prompt_part(args, root, hf, build_s)
    if "conversation" in parts:
        conversation_part(args, root, hf)
    return 0


def prompt_part(args: argparse.Namespace, root: Path, hf: Any, build_s: float) -> None:
    """One long prompt: cold, store hit, and whole score calls (the first table)."""
    rng = random.Random(1)
    lines: list[str] = []
    prompt = ""
    while len(hf.encode(prompt)) < args.tokens:
        lines += builtin_corpus(seed=rng.randrange(1 << 30), sentences=50)
        prompt = "\n".join(lines)
    ids = hf.encode(prompt)
    while len(ids) > args.tokens:  # trim to about the target length
        lines.pop()
        prompt = "\n".join(lines)
        ids = hf.encode(prompt)
    tails = [
        f"\nQuestion {i}: which pod holds block {rng.randrange(10**6)}?"
        for i in range(args.iters + 1)
    ]

    def config(cache_size: int) -> IndexerConfig:
        return IndexerConfig.from_dict(
            {
                "tokenizersPoolConfig": {"local": {"autoDiscoveryDir": str(root)}},
                "prefixStoreConfig": {"blockSize": args.block_size, "cacheSize": cache_size},
            }
        )

    warm = Indexer(config(500_000))
    nostore = Indexer(config(0))
    svc, svc0 = warm.tokenization, nostore.tokenization
    keys = warm.block_keys(ids, MODEL)
    for n, pod in enumerate(PODS):
        warm.index.add(pod, keys[: len(keys) * (n + 1) // len(PODS)])

    def cold(i: int) -> None:
        svc.store.clear()
        svc.tokenize(MODEL, prompt=prompt + tails[i])

    def hit(i: int) -> None:
        svc.tokenize(MODEL, prompt=prompt + tails[i])

    def cold_score(i: int) -> None:
        svc.store.clear()
        warm.score(MODEL, pods=PODS, prompt=prompt + tails[i])

    def warm_score(i: int) -> None:
        warm.score(MODEL, pods=PODS, prompt=prompt + tails[i])

    def chat(i: int) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": prompt},
            {"role": "user", "content": tails[i].strip()},
        ]

    def cold_chat(i: int) -> None:
        svc.store.clear()
        warm.score(MODEL, pods=PODS, messages=chat(i))

    def warm_chat(i: int) -> None:
        warm.score(MODEL, pods=PODS, messages=chat(i))

    paths: dict[str, Callable[[int], object]] = {
        "transformers encode": lambda i: hf.encode(prompt + tails[i]),
        "cold (no store)": lambda i: svc0.tokenize(MODEL, prompt=prompt + tails[i]),
        "cold (store learns)": cold,
        "prefix-store hit": hit,
        "score(prompt) cold": cold_score,
        "score(prompt) warm": warm_score,
        "score(token_ids)": lambda i: warm.score(MODEL, ids, PODS),
        "score(messages) cold": cold_chat,
        "score(messages) warm": warm_chat,
    }
    warm_paths = {"prefix-store hit", "score(prompt) warm", "score(messages) warm"}

    def warm_up() -> None:
        svc.tokenize(MODEL, prompt=prompt)
        svc.tokenize(MODEL, messages=chat(-1))

    results = _interleaved(paths, warm_paths, warm_up, args.iters)
    example = svc.tokenize_request(MODEL, prompt=prompt + tails[0])
    assert example.source == "prefix_store", example.source

    print(
        f"prompt: {len(ids)} tokens, {len(prompt)} chars ({len(prompt) / len(ids):.2f} chars/token);"
        f" vocab {len(hf)}; store chunk {args.block_size} chars; tokenizer built in {build_s:.2f} s"
    )
    print(
        f"store hit covers {example.covered_chars}/{example.chars} chars, "
        f"{len(example.token_ids)}/{len(hf.encode(prompt + tails[0]))} tokens"
    )
    base = statistics.median(results["cold (no store)"])
    print(f"\n{'path':<22} {'p50 ms':>9} {'p99 ms':>9} {'cold/p50':>9}")
    for name, values in results.items():
        p50 = statistics.median(values)
        print(f"{name:<22} {p50 * 1e3:>9.3f} {_pct(values, 0.99) * 1e3:>9.3f} {base / p50:>8.1f}x")
    cold_p50 = statistics.median(results["score(prompt) cold"])
    warm_p50 = statistics.median(results["score(prompt) warm"])
    hit_p50 = statistics.median(results["prefix-store hit"])
    print(
        f"\nscore(prompt): cold {cold_p50 * 1e3:.2f} ms -> warm {warm_p50 * 1e3:.2f} ms "
        f"({cold_p50 / warm_p50:.1f}x); tokenization: cold {base * 1e3:.2f} ms -> "
        f"store hit {hit_p50 * 1e3:.3f} ms ({base / hit_p50:.1f}x); target >= 10x"
    )
    warm.close()
    nostore.close()


def conversation_part(args: argparse.Namespace, root: Path, hf: Any) -> None:
    """Growing conversations: CPU of tokenizing every turn, stitched, re-tokenized, no store."""
    rng = random.Random(2)
    corpus = builtin_corpus(seed=3, sentences=6000)

    def message() -> str:
        out: list[str] = []
        while sum(map(len, out)) < args.turn_chars:
            out.append(rng.choice(corpus))
        return " ".join(out)

    system = message() * 4
    chats: list[list[dict[str, str]]] = [
        [{"role": "system", "content": system}] for _ in range(args.sessions)
    ]
    turns: list[list[dict[str, str]]] = []  # each request's messages, in arrival order
    for _ in range(args.turns):
        for chat in chats:
            chat.append({"role": "user", "content": message()})
            turns.append(list(chat))
            chat.append({"role": "assistant", "content": message()})

    def run(cache_size: int, stitch: bool) -> tuple[float, dict[str, int], int]:
        indexer = Indexer(
            IndexerConfig.from_dict(
                {
                    "tokenizersPoolConfig": {"local": {"autoDiscoveryDir": str(root)}},
                    "prefixStoreConfig": {"blockSize": args.block_size, "cacheSize": cache_size},
                }
            )
        )
        svc = indexer.tokenization
        svc.tokenize(MODEL, prompt="warm up the tokenizer")
        tok = svc.registry.get(MODEL)
        if tok.store_rules is not None and not stitch:
            tok.store_rules = dataclasses.replace(tok.store_rules, stitch=False)
        sources: dict[str, int] = {}
        wrong = 0
        t0 = time.process_time()
        results = []
        for msgs in turns:
            r = svc.tokenize_request(MODEL, messages=msgs)
            sources[r.source] = sources.get(r.source, 0) + 1
            results.append(r)
        spent = time.process_time() - t0
        for msgs, r in zip(turns, results, strict=True):
            text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids = hf.encode(text, add_special_tokens=False)
            n = len(r.token_ids)
            if r.token_ids != ids[:n] or (r.complete and n != len(ids)):
                wrong += 1
        indexer.close()
        return spent, sources, wrong

    runs = {
        "store, stitched tails": run(500_000, True),
        "store, whole re-tokenize": run(500_000, False),
        "no store": run(0, True),
    }
    chars = [
        len(hf.apply_chat_template(m, tokenize=False, add_generation_prompt=True)) for m in turns
    ]
    print(
        f"\nconversations: {args.sessions} x {args.turns} turns, rendered chats of "
        f"{min(chars)}-{max(chars)} chars ({sum(chars) / len(chars):.0f} mean)"
    )
    base = runs["no store"][0]
    print(f"{'path':<26} {'CPU ms':>9} {'ms/turn':>8} {'vs no store':>12}  sources")
    for name, (spent, sources, wrong) in runs.items():
        mix = ", ".join(f"{k} {v}" for k, v in sorted(sources.items()))
        bad = f"  ({wrong} WRONG)" if wrong else ""
        print(
            f"{name:<26} {spent * 1e3:>9.1f} {spent * 1e3 / len(turns):>8.3f} "
            f"{base / spent:>11.1f}x  {mix}{bad}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
