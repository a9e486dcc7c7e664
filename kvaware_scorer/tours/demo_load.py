"""The load of ``kvaware demo``: its settings, the shared-prefix requests and what they cost.

`DemoSettings` holds every size of a demo run; `build_workload` makes the requests (groups of
questions behind one long system prompt, half of the groups as chat); `scheduler_config`
points a shipped EndpointPickerConfig at the demo's local tokenizer; `default_num_gpu_blocks`
sizes the pods' KV cache so that random routing thrashes and affinity does not; `ideal_hits`
is the hit rate an infinite cache would have reached (the report's "ideal" column).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.resources import resolve_config
from kvaware_scorer.sim.profiles import get_profile

__all__ = [
    "DEMO_MODEL",
    "DemoRequest",
    "DemoSettings",
    "build_workload",
    "default_num_gpu_blocks",
    "ideal_hits",
    "is_chat",
    "scheduler_config",
    "tokenize_all",
]

#: Plugin types whose parameters get the local tokenizer (they tokenize text prompts).
_TOKENIZING_PLUGINS = ("precise-prefix-cache-scorer", "precise-prefix-cache-producer")
#: The model name the pods serve and the requests name.
DEMO_MODEL = "kvaware/demo-8b"


@dataclass
class DemoSettings:
    """What the demo runs (defaults: the full demo; `quick` shrinks the load).

    Attributes:
        configs: Scheduler YAMLs run in turn (the last is the baseline of the ratios).
        pods: Live pods per run.
        profile: Engine profile of the pods.
        speedup: Emulated seconds per wall second.
        concurrency: Concurrent clients (closed loop: each sends its next request when the
            previous one ended).
        requests: Requests per config.
        groups: Shared system prompts.
        prompts_per_group: Distinct questions per group.
        system_words: Words per system prompt (about 1.25 tokens each).
        question_words: Words per question.
        output_tokens: ``max_tokens`` of every request.
        chat_share: Fraction of the groups sent as chat messages (the others as text prompts).
        num_gpu_blocks: KV blocks per pod; None = about 1.4x what one pod needs under perfect
            affinity (see the module docstring).
        seed: Seed of the workload and of the pickers.
        timeout: Wall seconds after which everything is stopped.
        json_path: Write the summaries as JSON here.
        via: ``gateway`` (``kvaware serve``'s proxy) or ``envoy`` (Envoy + ``kvaware epp``).
    """

    configs: tuple[str, ...] = ("precise", "random")
    pods: int = 4
    profile: str = "llama-3.1-8b-1xh100"
    speedup: float = 1.0
    concurrency: int = 16
    requests: int = 1200
    groups: int = 12
    prompts_per_group: int = 6
    system_words: int = 2000
    question_words: int = 60
    output_tokens: int = 24
    chat_share: float = 0.5
    num_gpu_blocks: int | None = None
    seed: int = 0
    timeout: float = 170.0
    json_path: str | None = None
    quick: bool = False
    via: str = "gateway"

    @classmethod
    def quick_settings(cls, **changes: Any) -> DemoSettings:
        """The ``--quick`` sizes (same shape, fewer requests)."""
        base: dict[str, Any] = {"requests": 500, "timeout": 90.0, "quick": True}
        base.update(changes)
        return cls(**base)


@dataclass(frozen=True)
class DemoRequest:
    """One request of the demo load.

    Attributes:
        index: Position in the sequence sent.
        group: Its system prompt.
        chat: Sent as chat messages (else as a text prompt).
        body: The OpenAI request body (without the streaming fields).
    """

    index: int
    group: int
    chat: bool
    body: dict[str, Any]


def _vocabulary() -> list[str]:
    from kvaware_scorer.tokenization import builtin_corpus

    return sorted({w for line in builtin_corpus() for w in re.findall(r"[a-z]+", line.lower())})


def build_workload(settings: DemoSettings, model: str = DEMO_MODEL) -> list[DemoRequest]:
    """The shared-prefix load: groups x questions, shuffled once and sent in a cycle.

    Group ``g`` is sent as chat messages (system + user) when ``g`` falls in the chat share,
    else as one text prompt (system prompt, blank line, question).
    """
    rng = random.Random(settings.seed)
    words = _vocabulary()

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    systems = [
        f"You are assistant {g} of the kvaware demo. " + text(settings.system_words)
        for g in range(settings.groups)
    ]
    pairs = [
        (g, text(settings.question_words))
        for g in range(settings.groups)
        for _ in range(settings.prompts_per_group)
    ]
    rng.shuffle(pairs)
    out: list[DemoRequest] = []
    for i in range(settings.requests):
        g, question = pairs[i % len(pairs)]
        chat = is_chat(g, settings.chat_share)
        body: dict[str, Any] = {"model": model, "max_tokens": settings.output_tokens}
        if chat:
            body["messages"] = [
                {"role": "system", "content": systems[g]},
                {"role": "user", "content": question},
            ]
        else:
            body["prompt"] = systems[g] + "\n\n" + question
        out.append(DemoRequest(i, g, chat, body))
    return out


def is_chat(group: int, share: float) -> bool:
    """Whether `group` is sent as chat: `share` of the groups, spread evenly."""
    return math.floor((group + 1) * share) > math.floor(group * share)


def scheduler_config(path: str | Path, tokenizer_root: str | Path) -> dict[str, Any]:
    """The EndpointPickerConfig at `path`, its tokenizing plugins pointed at `tokenizer_root`
    (``tokenizersPoolConfig.local.autoDiscoveryDir``).

    Raises:
        ConfigError: The file is missing or is not a mapping with ``plugins``.
    """
    file = resolve_config(path)
    if not file.is_file():
        raise ConfigError("scheduler config not found", str(file))
    data = yaml.safe_load(file.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("plugins"), list):
        raise ConfigError("not an EndpointPickerConfig (no plugins list)", str(file))
    for plugin in data["plugins"]:
        if isinstance(plugin, dict) and plugin.get("type") in _TOKENIZING_PLUGINS:
            params = plugin.setdefault("parameters", None) or {}
            plugin["parameters"] = params
            pool = params.setdefault("tokenizersPoolConfig", {})
            pool.setdefault("local", {})["autoDiscoveryDir"] = str(tokenizer_root)
    return data


def default_num_gpu_blocks(settings: DemoSettings) -> int:
    """About 1.4x the system-prompt blocks one pod holds under perfect affinity, plus the
    blocks of the requests it runs at once."""
    profile = get_profile(settings.profile)
    bs = profile.block_size
    system_tokens = settings.system_words * 1.25 + 20
    per_pod = math.ceil(settings.groups / settings.pods) * system_tokens / bs
    running = math.ceil(settings.concurrency / settings.pods) * 2
    own = (settings.question_words * 1.25 + settings.output_tokens + 40) / bs
    return int(1.4 * per_pod + running * (own + 1)) + 1


def ideal_hits(token_lists: Sequence[Sequence[int]], block_size: int) -> list[int]:
    """Hit of each prompt in an infinite cache that saw every earlier prompt (capped like
    vLLM at ``len - 1`` tokens, full blocks only)."""
    seen: set[bytes] = set()
    out: list[int] = []
    for ids in token_lists:
        digest = b""
        chain: list[bytes] = []
        for k in range(len(ids) // block_size):
            block = ids[k * block_size : (k + 1) * block_size]
            digest = hashlib.blake2b(
                digest + b"".join(t.to_bytes(4, "little") for t in block), digest_size=16
            ).digest()
            chain.append(digest)
        cap = (len(ids) - 1) // block_size
        hit = 0
        while hit < cap and chain[hit] in seen:
            hit += 1
        out.append(hit * block_size)
        seen.update(chain)
    return out


def tokenize_all(requests: Sequence[DemoRequest], tokenizer: Path) -> list[list[int]]:
    """The token ids the pods will see for each request (same tokenization code)."""
    from kvaware_scorer.config import LocalTokenizerConfig, PrefixStoreConfig, TokenizersPoolConfig
    from kvaware_scorer.tokenization import TokenizationService

    service = TokenizationService(
        TokenizersPoolConfig(
            local=LocalTokenizerConfig(model_tokenizer_map={DEMO_MODEL: str(tokenizer)})
        ),
        PrefixStoreConfig(cache_size=0),
    )
    cache: dict[str, list[int]] = {}
    out: list[list[int]] = []
    try:
        for r in requests:
            key = json.dumps(r.body.get("messages") or r.body.get("prompt"), sort_keys=True)
            ids = cache.get(key)
            if ids is None:
                if r.chat:
                    ids = service.tokenize(DEMO_MODEL, messages=r.body["messages"])
                else:
                    ids = service.tokenize(DEMO_MODEL, prompt=r.body["prompt"])
                cache[key] = ids
            out.append(ids)
    finally:
        service.close()
    return out
