"""``request-attribute-reporter``: upstream's response plugin that reports a value computed from
the response's token usage back to the proxy, as ``ext_proc`` dynamic metadata (e.g. a
request's token cost for Envoy's rate limiting by cost).

When a response ends (whatever its status), the ``usage`` object it reported is bound as the CEL
variable ``usage``, shaped as upstream's: ``prompt_tokens``, ``completion_tokens`` and
``total_tokens`` always present (0 when the response did not report them, as upstream's parser
leaves them), ``prompt_tokens_details.cached_tokens``
present when the response reported it, every number a double (upstream converts the usage to
a ``google.protobuf.Struct``, whose numbers are doubles: add ``usage.x + 1.0``, not ``+ 1``).
If ``condition`` is set and does not evaluate to ``true``, nothing is reported. Otherwise
``expression`` must evaluate to an int or a double; it is truncated to an integer, and reported
as a number at ``key.namespace`` (default ``envoy.lb``) / ``key.name``, unless it is 0 or -1
(upstream skips both). Evaluation errors (a missing key, an int added to a double) report
nothing and are counted in `RequestAttributeReporter.failures` and logged at most once a minute.

The Endpoint Picker sends the metadata with its answer to the response's last body chunk (or to
its headers when the response has no body), as upstream does; Envoy applies it when its
``ext_proc`` filter lists the namespace in ``metadata_options.receiving_namespaces``. The
standalone gateway has no proxy to hand it to and leaves it unused.

Parameters and their checks are upstream's: exactly one entry in ``attributes``, a non-empty
``key.name`` and ``expression``, and both expressions compile (with ``usage`` the only
variable). The CEL dialect is `kvaware_scorer.scheduler.cel`'s (bounded in time and memory).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Final

from pydantic import Field, field_validator

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.scheduler import (
    PluginContext,
    PluginRegistry,
    ResponseInfo,
    SchedulingRequest,
    SchedulingResult,
)
from kvaware_scorer.scheduler.cel import (
    CelError,
    CelProgram,
    CelSyntaxError,
    UInt,
    compile_cel,
    short,
)

__all__ = [
    "DEFAULT_NAMESPACE",
    "AttributeKey",
    "ReportedAttribute",
    "RequestAttributeReporter",
    "RequestAttributeReporterParams",
    "register",
    "usage_struct",
]

logger = logging.getLogger(__name__)

#: ``key.namespace`` when unset (upstream).
DEFAULT_NAMESPACE: Final = "envoy.lb"
#: Seconds between two log lines about failed evaluations.
_LOG_INTERVAL: Final = 60.0
_VARIABLES: Final = frozenset({"usage"})


class AttributeKey(ConfigModel):
    """Where the value goes: dynamic metadata ``namespace`` (default ``envoy.lb``) / ``name``."""

    namespace: str = ""
    name: str = ""


class ReportedAttribute(ConfigModel):
    """One reported value: its key, the CEL ``expression`` computing it (an int or double) and
    an optional CEL ``condition`` (a bool) that must hold for it to be reported."""

    key: AttributeKey = Field(default_factory=AttributeKey)
    expression: str = ""
    condition: str = ""


class RequestAttributeReporterParams(ConfigModel):
    """Parameters of ``request-attribute-reporter``: ``attributes``, exactly one entry."""

    attributes: list[ReportedAttribute] = Field(default_factory=list)

    @field_validator("attributes")
    @classmethod
    def _check(cls, value: list[ReportedAttribute]) -> list[ReportedAttribute]:
        if len(value) != 1:
            raise ValueError("attributes must contain exactly one entry")
        attr = value[0]
        if not attr.key.name:
            raise ValueError("attributes[0].key.name cannot be empty")
        if not attr.expression:
            raise ValueError("attributes[0].expression cannot be empty")
        for what, text in (("expression", attr.expression), ("condition", attr.condition)):
            if text:
                try:
                    compile_cel(text, _VARIABLES)
                except CelSyntaxError as exc:
                    raise ValueError(f"attributes[0].{what}: failed to compile: {exc}") from None
        if not attr.key.namespace:
            attr.key.namespace = DEFAULT_NAMESPACE
        return value


def usage_struct(response: ResponseInfo) -> dict[str, Any]:
    """The CEL ``usage`` variable of `response` (see the module documentation)."""
    usage: dict[str, Any] = {
        "prompt_tokens": float(response.prompt_tokens),
        "completion_tokens": float(response.completion_tokens),
        "total_tokens": float(response.total_tokens or 0),
    }
    if response.cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": float(response.cached_tokens)}
    return usage


class RequestAttributeReporter:
    """``request-attribute-reporter`` (see the module documentation)."""

    def __init__(self, params: RequestAttributeReporterParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        attr = params.attributes[0]
        self.namespace = attr.key.namespace or DEFAULT_NAMESPACE
        self.key = attr.key.name
        self.expression: CelProgram = compile_cel(attr.expression, _VARIABLES)
        self.condition: CelProgram | None = (
            compile_cel(attr.condition, _VARIABLES) if attr.condition else None
        )
        #: Responses whose condition or expression failed to evaluate (or gave no number).
        self.failures = 0
        self._logged_at = -math.inf

    def value(self, response: ResponseInfo) -> int | None:
        """What would be reported for `response`: an integer, or None for nothing."""
        try:
            variables = {"usage": usage_struct(response)}
        except (OverflowError, TypeError, ValueError) as exc:
            self._failed("unreadable usage: %s", exc)
            return None
        try:
            if self.condition is not None and self.condition.evaluate(variables) is not True:
                return None
            raw = self.expression.evaluate(variables)
        except CelError as exc:
            self._failed("evaluation failed: %s", exc)
            return None
        if isinstance(raw, bool | UInt) or not isinstance(raw, int | float):
            # NOTE: upstream takes an int64 or a float64 only (a uint is a type error there).
            self._failed("the expression gave %s, not an int or a double", short(raw))
            return None
        if isinstance(raw, float) and not (math.isfinite(raw) and abs(raw) < 2.0**63):
            self._failed("the expression gave %s, out of the int64 range", short(raw))
            return None
        number = int(raw)  # truncated toward zero, as Go's int64(float64)
        if number in (0, -1):
            return None  # upstream skips zero, and -1 (its error marker)
        return number

    def post_response(
        self, request: SchedulingRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        number = self.value(response)
        if number is None:
            return
        response.dynamic_metadata.setdefault(self.namespace, {})[self.key] = float(number)

    def _failed(self, msg: str, *args: Any) -> None:
        self.failures += 1
        now = time.monotonic()
        if now - self._logged_at >= _LOG_INTERVAL:
            self._logged_at = now
            logger.warning(
                "%s: %s (%d failures so far; logged at most once a minute)",
                self.name,
                msg % args,
                self.failures,
            )


def register(registry: PluginRegistry) -> None:
    """Register ``request-attribute-reporter``."""
    registry.register(
        "request-attribute-reporter",
        RequestAttributeReporter,
        params=RequestAttributeReporterParams,
        kinds=("post-response",),
        description="reports a CEL expression over the response's token usage to the proxy "
        "as dynamic metadata",
    )
