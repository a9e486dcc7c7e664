"""Request state shared by a live pod's step task and its HTTP handlers.

A `Job` is one HTTP request: its `LiveRequest` choices and the queue on which the step task
reports their progress (or a `PodFailure`). The pod (``live_pod.py``) fills them; the HTTP
server (``server.py``) reads them.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import numpy as np

from kvaware_scorer.sim.engine import EngineRequest

if TYPE_CHECKING:
    pass

__all__ = ["Job", "LiveRequest", "PodFailure"]


class PodFailure:
    """What a handler receives when its requests cannot finish (the engine failed)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class LiveRequest:
    """One engine request of an HTTP request (one choice): its state as handlers see it.

    Attributes:
        engine_request: The engine's request.
        job: The HTTP request it belongs to.
        index: Its choice index.
        sent: Output tokens handed to the handler so far.
    """

    __slots__ = ("engine_request", "index", "job", "sent")

    def __init__(self, engine_request: EngineRequest, job: Job, index: int) -> None:
        self.engine_request = engine_request
        self.job = job
        self.index = index
        self.sent = 0

    @property
    def output_tokens(self) -> np.ndarray:
        """All the tokens this request will generate."""
        return self.engine_request.sim.output_tokens

    @property
    def cached_tokens(self) -> int:
        """Prefix-cache hit at its first admission (vLLM's ``num_cached_tokens``)."""
        return max(self.engine_request.num_cached_tokens, 0)

    @property
    def prompt_tokens(self) -> int:
        """Prompt length in tokens."""
        return self.engine_request.num_prompt_tokens


class Job:
    """The engine requests of one HTTP request and the queue of their progress.

    The step task puts ``(choice index, tokens generated so far, finished)`` tuples (or a
    `PodFailure`) on `queue` after every step that advanced one of them.
    """

    __slots__ = ("finished", "queue", "requests")

    def __init__(self) -> None:
        self.requests: list[LiveRequest] = []
        self.queue: asyncio.Queue[tuple[int, int, bool] | PodFailure] = asyncio.Queue()
        self.finished = 0

    @property
    def done(self) -> bool:
        """Whether every choice finished."""
        return self.finished >= len(self.requests)
