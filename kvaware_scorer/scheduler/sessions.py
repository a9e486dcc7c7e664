"""Session affinity state shared by ``session-affinity-scorer`` and ``session-affinity-filter``:
a session's id from the request (headers, then request attributes), and the bounded, expiring
map of sessions to the pods they are bound to (upstream's ``session_id`` strategy).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.scheduler.datamodel import SchedulingRequest

__all__ = [
    "MAX_SESSION_KEY_CHARS",
    "MAX_TOKEN_CHARS",
    "SESSION_ID_HEADER",
    "SESSION_TOKEN_HEADER",
    "EncodedEndpointHeaderConfig",
    "SessionBindings",
    "decode_token",
    "encode_token",
    "session_id_of",
    "session_key",
]

#: Header carrying the base64 endpoint id (``encoded_endpoint_header`` strategy).
SESSION_TOKEN_HEADER = "x-session-token"
#: Header the session id is read from when no source is configured (``session_id`` strategy).
SESSION_ID_HEADER = "x-session-id"
#: Longest session id kept as it is; a longer one is kept as its SHA-256 digest.
MAX_SESSION_KEY_CHARS = 128
#: Longest session token decoded; longer ones are no session (an endpoint id is far shorter).
MAX_TOKEN_CHARS = 1024


class EncodedEndpointHeaderConfig(ConfigModel):
    """``encodedEndpointHeaderConfig``: the request and response header carrying the token."""

    header: str = SESSION_TOKEN_HEADER


def decode_token(token: str) -> str:
    """The endpoint id in a session token; "" when it is empty, too long, not standard padded
    base64, or not UTF-8 text."""
    if not token or len(token) > MAX_TOKEN_CHARS:
        return ""
    try:
        return base64.b64decode(token, validate=True).decode()
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        return ""


def encode_token(endpoint_id: str) -> str:
    """The session token of `endpoint_id` (standard base64)."""
    return base64.b64encode(endpoint_id.encode()).decode()


def session_key(session_id: str) -> str:
    """The binding key of `session_id`: itself, or its digest when longer than
    `MAX_SESSION_KEY_CHARS` (so a huge id costs no more memory than a short one)."""
    if len(session_id) <= MAX_SESSION_KEY_CHARS:
        return session_id
    return "sha256:" + hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()


def session_id_of(request: SchedulingRequest, sources: Sequence[tuple[str, str]]) -> str:
    """The request's session id (trimmed) from the first source that has one, else "".

    Args:
        request: The request.
        sources: ``(header, attribute)`` pairs in priority order: a lowercased header name, or
            "" and the name of a request attribute (``request.state["attribute:<name>"]``).
    """
    for header, attribute in sources:
        if header:
            value = request.headers.get(header, "")
        else:
            raw = request.state.get(f"attribute:{attribute}")
            value = raw if isinstance(raw, str) else ""
        value = value.strip() if isinstance(value, str) else ""
        if value:
            return value
    return ""


class SessionBindings:
    """Sessions bound to endpoint ids, each binding expiring `ttl` seconds after its last use.

    Bounded: at most `max_sessions` bindings (the least recently used dropped first), keys of
    at most `MAX_SESSION_KEY_CHARS` characters (`session_key`); expired bindings are dropped
    when looked up and, oldest first, whenever a session binds. Thread-safe.

    Args:
        ttl: Seconds a binding lives after its last use.
        max_sessions: Bindings kept at most.
        clock: Monotonic clock.
    """

    def __init__(self, ttl: float, max_sessions: int, clock: Callable[[], float]) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._clock = clock
        self._lock = threading.Lock()
        # session key -> (endpoint id, last use); ordered by last use, oldest first
        self._bindings: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._bindings)

    def bound(self, session_id: str) -> str | None:
        """The endpoint id `session_id` is bound to, None when unbound or expired."""
        key = session_key(session_id)
        with self._lock:
            entry = self._bindings.get(key)
            if entry is None:
                return None
            if self._clock() - entry[1] > self.ttl:
                del self._bindings[key]
                return None
            return entry[0]

    def bind(self, session_id: str, endpoint_id: str, present: bool | None) -> None:
        """Bind `session_id` to `endpoint_id` (refreshing its use), unless it is bound to another
        live endpoint that was a candidate (`present` is not False): only a bound pod seen
        missing from the candidates moves a session (a concurrent first bind, or a pick that
        merely differs, leaves it where it is)."""
        key = session_key(session_id)
        now = self._clock()
        with self._lock:
            entry = self._bindings.get(key)
            live = entry is not None and now - entry[1] <= self.ttl
            if live and entry is not None and entry[0] != endpoint_id and present is not False:
                return
            self._bindings[key] = (endpoint_id, now)
            self._bindings.move_to_end(key)
            while self._bindings:  # drop expired bindings, oldest first
                oldest = next(iter(self._bindings.values()))
                if now - oldest[1] <= self.ttl:
                    break
                self._bindings.popitem(last=False)
            while len(self._bindings) > self.max_sessions:
                self._bindings.popitem(last=False)

    def forget_endpoints(self, endpoint_ids: Iterable[str]) -> None:
        """Drop the sessions bound to `endpoint_ids` (pods that left the pool)."""
        gone = set(endpoint_ids)
        if not gone:
            return
        with self._lock:
            for key in [k for k, (pod, _) in self._bindings.items() if pod in gone]:
                del self._bindings[key]
