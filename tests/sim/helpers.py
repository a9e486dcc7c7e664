"""Shared helpers for the emulator tests: small engines, requests and a decoding event sink."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from kvaware_scorer.sim.engine import Engine, StepOutput
from kvaware_scorer.sim.hashing import BlockHasher, make_hasher
from kvaware_scorer.sim.profiles import EngineProfile, get_profile
from kvaware_scorer.sim.request import SimRequest


def small_profile(block_size: int = 16, **changes: Any) -> EngineProfile:
    """The Llama profile with a chosen block size and vLLM settings."""
    return get_profile("llama-3.1-8b-1xh100").with_overrides(block_size=block_size, **changes)


def make_engine(
    num_blocks: int, block_size: int = 16, hash_name: str = "xxh3", **changes: Any
) -> tuple[Engine, BlockHasher]:
    """An engine with a tiny pool."""
    profile = small_profile(block_size, **changes)
    hasher = make_hasher(hash_name, block_size)
    return Engine(profile, hasher, num_gpu_blocks=num_blocks), hasher


def make_request(
    rid: str,
    prompt: Sequence[int] | np.ndarray,
    max_tokens: int,
    hasher: BlockHasher,
    out_start: int = 50_000,
    **kw: Any,
) -> SimRequest:
    """A request whose prompt block hashes are filled in (as the fleet does)."""
    req = SimRequest(
        rid,
        0.0,
        np.asarray(prompt, dtype=np.int32),
        np.arange(out_start, out_start + max_tokens, dtype=np.int32),
        **kw,
    )
    req.block_hashes, req.hash_state = hasher.chain(
        req.prompt, 0, None, req.lora_name, req.cache_salt
    )
    return req


def step(engine: Engine, now: float = 0.0) -> StepOutput:
    """One whole engine step."""
    dur = engine.begin_step(now)
    return engine.finish_step(now + dur)


def wire_events(events: Sequence[Any]) -> list[dict[str, Any]]:
    """Events as the plain maps a consumer decodes."""
    out: list[dict[str, Any]] = msgspec.msgpack.decode(msgspec.msgpack.encode(list(events)))
    return out


class RecordingSink:
    """A KV-event sink that decodes every payload and keeps a reference-counted view per pod."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, str | None, int | None, list[Any]]] = []
        self.held: dict[str, Counter[int]] = {}

    def ingest(self, pod: str, model: str | None, payload: bytes, seq: int | None = None) -> None:
        batch = msgspec.msgpack.decode(payload)
        self.frames.append((pod, model, seq, batch))
        held = self.held.setdefault(pod, Counter())
        for ev in batch[1]:
            kind = ev["type"]
            if kind == "BlockStored":
                held.update(ev["block_hashes"])
            elif kind == "BlockRemoved":
                for h in ev["block_hashes"]:
                    held[h] -= 1
                    if held[h] <= 0:
                        del held[h]
            else:
                held.clear()
