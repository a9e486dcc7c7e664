"""``session-affinity-filter``: upstream llm-d's hard session pin, the filter counterpart of
``session-affinity-scorer`` (`kvaware_scorer.plugins.affinity`).

When the request's session names a pod among the candidates, that pod is the only candidate
left; with no session, an undecodable one, or a pod that is no longer a candidate, every
candidate passes unchanged. The filter never turns candidates into none.

Two strategies, as upstream:

* ``encoded_endpoint_header`` (default, stateless): the session is a request header holding the
  base64 endpoint id of the previous pick; the pick's token is returned to the client in that
  header (`SchedulingResult.response_headers`) so it can send it back.
* ``session_id`` (stateful): an opaque client session id (a header or a request attribute, first
  found wins) is bound to the pod that served it. An unbound session passes everything through;
  a session whose pod is not a candidate passes everything through and re-binds to the new pick.
  Nothing is returned to the client.

Bounds: a token longer than `MAX_TOKEN_CHARS` is ignored undecoded; a session id longer than
`MAX_SESSION_KEY_CHARS` is stored as its SHA-256 digest; at most ``maxSessions`` bindings are
kept (least recently used dropped first), a binding unused for ``evictionTtlSeconds`` is dropped
(on use, and oldest-first whenever a session binds), and a pod leaving the pool drops its
bindings. Memory is thus at most ``maxSessions`` x (160 + endpoint id) characters of keys.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.scheduler import (
    Endpoint,
    PluginContext,
    PluginRegistry,
    SchedulingContext,
    SchedulingRequest,
    SchedulingResult,
)
from kvaware_scorer.scheduler.sessions import (
    MAX_SESSION_KEY_CHARS,
    MAX_TOKEN_CHARS,
    SESSION_ID_HEADER,
    SESSION_TOKEN_HEADER,
    EncodedEndpointHeaderConfig,
    SessionBindings,
    decode_token,
    encode_token,
    session_id_of,
)

__all__ = [
    "DEFAULT_EVICTION_SWEEP_SECONDS",
    "DEFAULT_EVICTION_TTL_SECONDS",
    "MAX_SESSION_KEY_CHARS",
    "MAX_TOKEN_CHARS",
    "SESSION_ID_HEADER",
    "SESSION_TOKEN_HEADER",
    "SessionAffinityFilter",
    "SessionAffinityFilterParams",
    "SessionFilterIDConfig",
    "SessionFilterIDSource",
    "register",
]

logger = logging.getLogger(__name__)

#: ``evictionTtlSeconds`` when unset or 0 (upstream).
DEFAULT_EVICTION_TTL_SECONDS = 300.0
#: ``evictionSweepSeconds`` when unset or 0 (upstream).
DEFAULT_EVICTION_SWEEP_SECONDS = 10.0


def normalize_header(name: str) -> str:
    """A configured header name as request headers are keyed: trimmed, lowercased, and the
    default token header when empty (as upstream)."""
    return name.strip().lower() or SESSION_TOKEN_HEADER


class SessionFilterIDSource(ConfigModel):
    """One place the session id is read from: ``header`` (a request header) or ``attribute`` (a
    request attribute another plugin sets, e.g. ``agent-identity``); ``producer`` is accepted
    (attributes are read by name here). Exactly one of the two is checked under ``session_id``."""

    header: str = ""
    attribute: str = ""
    producer: str = ""


class SessionFilterIDConfig(ConfigModel):
    """``sessionIdConfig``: used (and checked) only under ``strategy: session_id``.

    Attributes:
        sources: Where the session id is read, first non-empty wins; empty or absent: one
            ``x-session-id`` header source.
        eviction_ttl_seconds: A binding unused this long is forgotten (0: 300).
        eviction_sweep_seconds: Upstream's sweep period (0: 10); checked, but expiry happens on
            use and whenever a session binds here.
        max_sessions: Bindings kept at most, least recently used dropped first (kvaware's bound;
            not an upstream parameter).
    """

    sources: list[SessionFilterIDSource] = Field(default_factory=list)
    eviction_ttl_seconds: float = 0.0
    eviction_sweep_seconds: float = 0.0
    max_sessions: int = Field(100_000, ge=1)

    def problems(self) -> list[str]:
        """What upstream rejects in a ``session_id`` configuration (after defaults)."""
        out = [
            f"sources[{i}]: exactly one of header or attribute must be set"
            for i, src in enumerate(self.sources)
            if bool(src.header) == bool(src.attribute)
        ]
        for key, value in (
            ("evictionTtlSeconds", self.eviction_ttl_seconds),
            ("evictionSweepSeconds", self.eviction_sweep_seconds),
        ):
            if not value > 0 or math.isinf(value):
                out.append(f"{key} must be > 0 and finite, got {value}")
        return out


class SessionAffinityFilterParams(ConfigModel):
    """Parameters of ``session-affinity-filter``.

    Attributes:
        strategy: ``encoded_endpoint_header`` (default) or ``session_id``; only the matching
            config block is used.
        encoded_endpoint_header_config: ``{header}``: the request and response header carrying
            the token (default ``x-session-token``).
        session_id_config: Session id sources, eviction and bound.
        profile_name: The profile whose pick the session is pinned to (default: the primary).
    """

    strategy: Literal["encoded_endpoint_header", "session_id"] = "encoded_endpoint_header"
    encoded_endpoint_header_config: EncodedEndpointHeaderConfig = Field(
        default_factory=EncodedEndpointHeaderConfig
    )
    session_id_config: SessionFilterIDConfig = Field(default_factory=SessionFilterIDConfig)
    profile_name: str = ""

    @field_validator("session_id_config")
    @classmethod
    def _session_id_defaults(
        cls, value: SessionFilterIDConfig, info: ValidationInfo
    ) -> SessionFilterIDConfig:
        """Fill upstream's defaults (empty sources, zero durations), then check the block only
        when the strategy uses it, as upstream does."""
        if not value.sources:
            value.sources = [SessionFilterIDSource(header=SESSION_ID_HEADER)]
        if value.eviction_ttl_seconds == 0:
            value.eviction_ttl_seconds = DEFAULT_EVICTION_TTL_SECONDS
        if value.eviction_sweep_seconds == 0:
            value.eviction_sweep_seconds = DEFAULT_EVICTION_SWEEP_SECONDS
        if info.data.get("strategy") == "session_id":
            problems = value.problems()
            if problems:
                raise ValueError("; ".join(problems))
        return value


class SessionAffinityFilter:
    """``session-affinity-filter``: keeps only the pod the request's session is pinned to when it
    is a candidate, else every candidate (see the module documentation)."""

    def __init__(self, params: SessionAffinityFilterParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.strategy = params.strategy
        self.profile = params.profile_name
        self.header = normalize_header(params.encoded_endpoint_header_config.header)
        sid = params.session_id_config
        self.sources = [
            (normalize_header(s.header), "") if s.header else ("", s.attribute) for s in sid.sources
        ]
        self.bindings = SessionBindings(sid.eviction_ttl_seconds, sid.max_sessions, ctx.clock)

    # -- session lookup -----------------------------------------------------------------------

    def session_id(self, request: SchedulingRequest) -> str:
        """The request's session id (trimmed) from the first source that has one, else ""."""
        return session_id_of(request, self.sources)

    def bound(self, session_id: str) -> str | None:
        """The endpoint id `session_id` is bound to, None when unbound or expired."""
        return self.bindings.bound(session_id)

    @property
    def sessions(self) -> int:
        """Bindings held (expired ones not yet dropped included)."""
        return len(self.bindings)

    # -- filter ---------------------------------------------------------------------------------

    def filter(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        if not endpoints:
            return endpoints
        if self.strategy == "encoded_endpoint_header":
            token = request.headers.get(self.header, "")
            wanted = decode_token(token) if isinstance(token, str) else ""
        else:
            sid = self.session_id(request)
            wanted = (self.bound(sid) or "") if sid else ""
        if not wanted:
            return endpoints
        for e in endpoints:
            if e.id == wanted:
                if self.strategy == "session_id":
                    request.state[self.name] = True
                return [e]
        if self.strategy == "session_id":
            request.state[self.name] = False  # bound pod no candidate: the next pick re-binds
        return endpoints

    # -- after the decision ---------------------------------------------------------------------

    def pre_request(
        self, ctx: SchedulingContext, request: SchedulingRequest, result: SchedulingResult
    ) -> None:
        """Return the pick's token (header strategy) or bind the session to the pick."""
        present = request.state.pop(self.name, None)
        pick = result.pick_of(self.profile)
        if pick is None:
            return  # e.g. profileName: prefill on a decode-only request: nothing to pin
        if self.strategy == "encoded_endpoint_header":
            result.response_headers[self.header] = encode_token(pick.id)
            return
        sid = self.session_id(request)
        if sid:
            self.bindings.bind(sid, pick.id, present)

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        """Forget sessions bound to pods that left the pool (their next request re-binds)."""
        if self.strategy == "session_id":
            self.bindings.forget_endpoints(e.id for e in removed)


def register(registry: PluginRegistry) -> None:
    """Register ``session-affinity-filter``."""
    registry.register(
        "session-affinity-filter",
        SessionAffinityFilter,
        params=SessionAffinityFilterParams,
        kinds=("filter", "pre-request"),
        description="pins a session to the pod it was sent to, as a hard constraint",
    )
