"""Rendering of request-supplied chat templates in separate processes, within a budget.

A chat template sent with a request is code from the client: Jinja's sandbox keeps it from
reaching the host, but not from looping ``range(100000)`` inside ``range(100000)`` or building
gigabyte strings, and a thread running such a render can neither be stopped nor joined (it kept
tokenizer workers busy after the clients left, and kept the process from exiting on SIGTERM).

So the tokenizer's own template renders in the calling thread as before, and a request's
template renders in one of at most ``renderWorkers`` worker processes (started on demand,
niced, each with its own tokenizer registry built from the same pool config, so the rendering
code is the same). A render that takes longer than ``renderTimeout`` has its
process killed; a rendered text longer than ``renderMaxChars`` is refused in the worker; when
every worker is busy a render is refused at once rather than queued. Each refusal raises
`RenderBudgetError` (a `ValueError`, like any template error), so callers degrade exactly as
for a broken template. Outcomes are counted by the caller (``kvaware_chat_renders_total``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from kvaware_scorer.config import TokenizersPoolConfig

__all__ = ["RenderBudgetError", "RenderSandbox", "serve_worker"]

logger = logging.getLogger(__name__)

#: Seconds a fresh worker may take to load the model's tokenizer before its first render.
LOAD_TIMEOUT = 60.0
#: Characters of a worker's error message passed back.
_MAX_ERROR = 500
_HEAD = struct.Struct(">I")
_PR_SET_PDEATHSIG = 1


class RenderBudgetError(ValueError):
    """A request's chat template was not rendered: too slow, too long, or no worker free.

    Attributes:
        reason: ``timeout``, ``size``, ``busy`` (no worker free) or ``worker`` (the worker
            failed or the sandbox is closed).
    """

    def __init__(self, message: str, reason: str = "worker") -> None:
        super().__init__(message)
        self.reason = reason


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    """`n` bytes from `fd`, or TimeoutError at `deadline` (monotonic), EOFError at its end."""
    out = bytearray()
    while len(out) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, n - len(out))
        if not chunk:
            raise EOFError("the render worker closed its pipe")
        out += chunk
    return bytes(out)


def _send(fd: int, obj: Any) -> None:
    data = msgspec.json.encode(obj)
    view = memoryview(_HEAD.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _recv(fd: int, deadline: float | None, limit: int) -> Any:
    (n,) = _HEAD.unpack(_read_exact(fd, _HEAD.size, deadline))
    if n > limit:
        raise EOFError(f"the render worker sent {n} bytes, over {limit}")
    return msgspec.json.decode(_read_exact(fd, n, deadline))


def serve_worker() -> None:  # pragma: no cover - runs in the worker process
    """The worker process: read the pool config, then render requests until stdin closes.

    Frames on stdin/stdout are a 4-byte big-endian length and a JSON document (never pickle:
    the parent does not trust what a worker running client templates sends back).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    with contextlib.suppress(OSError):
        os.nice(10)  # a runaway render must not take CPU from the serving process
    if sys.platform.startswith("linux"):
        # NOTE: killed with the parent (even by SIGKILL): a render in progress never reads
        # stdin, so it would not notice the parent is gone and could loop on forever.
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() == 1:
                return
    from kvaware_scorer.tokenization.registry import TokenizerRegistry

    rfd, wfd = sys.stdin.fileno(), sys.stdout.fileno()
    sys.stdout = sys.stderr  # nothing but frames on the pipe
    try:
        registry = TokenizerRegistry(TokenizersPoolConfig.model_validate(_recv(rfd, None, 1 << 24)))
    except EOFError:
        return
    while True:
        try:
            model, messages, options, max_chars = _recv(rfd, None, 1 << 30)
        except EOFError:
            return
        try:
            tok = registry.get(model)
            _send(wfd, ["started", None])
            text = tok.render_chat(messages, **options)
            if len(text) > max_chars:
                reply = ["budget", f"the rendered text is {len(text)} characters, over {max_chars}"]
            else:
                reply = ["ok", text]
        except Exception as exc:
            reply = ["error", f"{type(exc).__name__}: {exc}"[:_MAX_ERROR]]
        try:
            _send(wfd, reply)
        except OSError:
            return


class _Worker:
    __slots__ = ("proc",)

    def __init__(self, pool_config: TokenizersPoolConfig) -> None:
        env = dict(os.environ)
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        # NOTE: a fresh interpreter (not fork: the serving process has threads whose held locks
        # a fork would copy; not multiprocessing: it re-runs the parent's main script).
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvaware_scorer.tokenization.render_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        assert self.proc.stdin is not None
        _send(self.proc.stdin.fileno(), pool_config.model_dump(mode="json", by_alias=True))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def call(self, request: list[Any], timeout: float, max_chars: int) -> tuple[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        rfd = self.proc.stdout.fileno()
        _send(self.proc.stdin.fileno(), request)
        kind, value = _recv(rfd, time.monotonic() + LOAD_TIMEOUT, 1 << 16)
        if kind == "started":
            try:
                kind, value = _recv(rfd, time.monotonic() + timeout, 4 * max_chars + 1024)
            except TimeoutError:
                raise RenderBudgetError(
                    f"the request's chat template did not render within {timeout:g} s (stopped)",
                    "timeout",
                ) from None
        return str(kind), value

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(2.0)
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(Exception):
                if pipe is not None:
                    pipe.close()


class RenderSandbox:
    """Renders request-supplied chat templates in killable worker processes.

    Args:
        pool_config: The tokenizer pool config (workers build their registry from it; its
            ``renderTimeout``, ``renderMaxChars`` and ``renderWorkers`` are the budget).
    """

    def __init__(self, pool_config: TokenizersPoolConfig) -> None:
        self.pool_config = pool_config
        self.timeout = pool_config.render_timeout
        self.max_chars = pool_config.render_max_chars
        self.size = pool_config.render_workers
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._closed = False

    def _acquire(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise RenderBudgetError("the render sandbox is closed")
            while self._idle:
                worker = self._idle.pop()
                if worker.alive():
                    self._busy.add(worker)
                    return worker
                worker.kill()
            if len(self._busy) >= self.size:
                raise RenderBudgetError(
                    f"all {self.size} chat-template render workers are busy; "
                    "the request's template was not rendered",
                    "busy",
                )
            try:
                worker = _Worker(self.pool_config)
            except OSError as exc:
                raise RenderBudgetError(f"no render worker could start: {exc}") from None
            self._busy.add(worker)
            return worker

    def _release(self, worker: _Worker, keep: bool) -> None:
        with self._lock:
            self._busy.discard(worker)
            if keep and not self._closed:
                self._idle.append(worker)
                return
        worker.kill()

    def render(
        self, model: str, messages: Sequence[Mapping[str, Any]], options: Mapping[str, Any]
    ) -> str:
        """`messages` rendered with the request's template (in `options`), within the budget.

        Raises:
            RenderBudgetError: Over the time or size budget, or no worker free.
            ValueError: The template or the messages are invalid (as in-process rendering).
        """
        worker = self._acquire()
        keep = False
        try:
            request = [model, list(messages), dict(options), self.max_chars]
            try:
                kind, value = worker.call(request, self.timeout, self.max_chars)
            except TimeoutError:
                raise RenderBudgetError("the render worker did not start in time") from None
            except (EOFError, OSError, ValueError, msgspec.DecodeError) as exc:
                if isinstance(exc, RenderBudgetError):
                    raise
                raise RenderBudgetError(f"the render worker failed: {exc!r}") from None
            keep = True
            if kind == "ok" and isinstance(value, str):
                return value
            if kind == "budget":
                raise RenderBudgetError(str(value), "size")
            raise ValueError(f"chat template rendering failed: {value}")
        finally:
            self._release(worker, keep)

    @property
    def workers(self) -> int:
        """Worker processes alive (idle or busy)."""
        with self._lock:
            return len(self._idle) + len(self._busy)

    def close(self) -> None:
        """Kill every worker (renders in progress fail with `RenderBudgetError`)."""
        with self._lock:
            self._closed = True
            workers = [*self._idle, *self._busy]
            self._idle.clear()
        for worker in workers:
            worker.kill()
