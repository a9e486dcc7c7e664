"""A request as the workload makes it and the fleet serves it (shared by workloads, engines, routers)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["RequestOutcome", "SimRequest"]


@dataclass(slots=True, eq=False)
class SimRequest:
    """One completion request of a workload.

    Attributes:
        request_id: Unique id.
        arrival_time: Virtual seconds since the start of the run.
        prompt: Prompt token ids (int32).
        output_tokens: The tokens the engine will generate (int32); their number is the
            request's ``max_tokens`` (generation ignores EOS, as the upstream benchmark does).
        prompt_key: Equal keys promise equal prompts (lets the fleet reuse block hashes).
        stage: Index of the load stage the request belongs to (reports group by it).
        session: Conversation or group id (workload bookkeeping only).
        turn: Turn number within a session.
        lora_name: LoRA adapter name, if any.
        lora_id: LoRA int id, if any.
        cache_salt: vLLM ``cache_salt``, if any.
        session_id: Session id sent to the engine (vLLM >= 0.30 echoes it in KV events).
        block_hashes: Engine hashes of the prompt's full blocks (filled by the fleet).
        hash_state: Engine hash chain state after the last full prompt block (fleet).
        extra: Free-form workload data.
    """

    request_id: str
    arrival_time: float
    prompt: np.ndarray
    output_tokens: np.ndarray
    prompt_key: Hashable | None = None
    stage: int = 0
    session: str | None = None
    turn: int = 0
    lora_name: str | None = None
    lora_id: int | None = None
    cache_salt: str | None = None
    session_id: str | None = None
    block_hashes: list[int] | None = None
    hash_state: object | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt length in tokens."""
        return len(self.prompt)

    @property
    def max_tokens(self) -> int:
        """Tokens to generate."""
        return len(self.output_tokens)


@dataclass(slots=True)
class RequestOutcome:
    """How a request went, as a client and the router's post-response hooks see it.

    Attributes:
        status: HTTP-like status (200 served, 400 rejected as too long).
        pod: Endpoint id that served it.
        prompt_tokens: Prompt length.
        cached_tokens: Prefix-cache hit at its first admission (vLLM's ``num_cached_tokens``).
        completion_tokens: Tokens generated.
        arrival_time: Virtual arrival time.
        first_token_time: Virtual time of the first output token (None if none).
        finish_time: Virtual time of completion (or rejection).
        preemptions: Times the engine preempted it.
        error: Why it failed, if it did.
    """

    status: int
    pod: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    arrival_time: float
    first_token_time: float | None
    finish_time: float
    preemptions: int = 0
    error: str | None = None
