"""Profile selection by request header (upstream llm-d's ``headerprofile`` plugin).

``header-profile-handler`` runs exactly one scheduling profile per request: the one named by
the value of a request header (``EPP-Profile`` by default). A caller that already knows which
stage a call is for (llm-d's coordinator, one scheduling call per encode / prefill / decode
step) can then use one scheduler for every stage. No routing header is set: nothing downstream
reads the other stages' picks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from pydantic import StrictStr, field_validator

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.errors import RequestRejectedError
from kvaware_scorer.scheduler import (
    PluginContext,
    PluginRegistry,
    ProfileResult,
    ProfileView,
    SchedulingContext,
    SchedulingRequest,
)
from kvaware_scorer.scheduler.profiles import single_result

__all__ = [
    "DEFAULT_HEADER_NAME",
    "DEFAULT_PROFILE",
    "MAX_SHOWN_VALUE",
    "HeaderProfileHandler",
    "HeaderProfileHandlerParams",
    "register",
]

logger = logging.getLogger(__name__)

#: The header read when ``headerName`` is empty (matched lower-cased, as headers are stored).
DEFAULT_HEADER_NAME = "EPP-Profile"
#: The profile run when ``defaultProfile`` is empty and the header is missing or blank.
DEFAULT_PROFILE = "decode"
#: Characters of a header value quoted in errors and logs at most (the rest is elided).
MAX_SHOWN_VALUE = 64


def _shown(value: str) -> str:
    """`value` quoted for an error message: bounded, escaped to printable ASCII."""
    if len(value) > MAX_SHOWN_VALUE:
        return f"{value[:MAX_SHOWN_VALUE]!a}... ({len(value)} characters)"
    return ascii(value)


class HeaderProfileHandlerParams(ConfigModel):
    """Parameters of ``header-profile-handler``.

    Attributes:
        header_name: The request header whose value names the profile to run; trimmed and
            matched case-insensitively (empty: ``EPP-Profile``).
        default_profile: The profile run when the header is missing or blank and more than
            one profile is configured; trimmed, matched case-sensitively (empty: ``decode``).
    """

    header_name: StrictStr = DEFAULT_HEADER_NAME
    default_profile: StrictStr = DEFAULT_PROFILE

    @field_validator("header_name")
    @classmethod
    def _header_name(cls, value: str) -> str:
        return value.strip().lower() or DEFAULT_HEADER_NAME.lower()

    @field_validator("default_profile")
    @classmethod
    def _default_profile(cls, value: str) -> str:
        return value.strip() or DEFAULT_PROFILE


class HeaderProfileHandler:
    """``header-profile-handler`` (see the module docstring).

    * With one profile configured, it always runs, whatever the header says.
    * Otherwise the trimmed header value names the profile (case-sensitively); a missing or
      blank header runs ``defaultProfile``.
    * A value naming no configured profile, or a missing header when ``defaultProfile`` is not
      configured either, runs no profile: scheduling fails with `RequestRejectedError` (429,
      upstream's status for this case) whose message gives the reason, quoting the value
      bounded to `MAX_SHOWN_VALUE` characters of escaped ASCII.

    Args:
        params: The validated parameters.
        ctx: The plugin context.
    """

    def __init__(self, params: HeaderProfileHandlerParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.header_name = params.header_name
        self.default_profile = params.default_profile

    def header_value(self, request: SchedulingRequest) -> str:
        """The trimmed value of the profile header ("" when missing or blank).

        The front doors store header names lower-cased; a caller that did not is matched
        case-insensitively.
        """
        value = request.headers.get(self.header_name)
        if value is None:
            value = next(
                (v for k, v in request.headers.items() if k.lower() == self.header_name), ""
            )
        return value.strip() if isinstance(value, str) else ""

    def pick_profiles(
        self,
        ctx: SchedulingContext,
        request: SchedulingRequest,
        profiles: Mapping[str, ProfileView],
        results: Mapping[str, ProfileResult],
    ) -> list[str]:
        """The profile named by the header (or the default, or the only one); none once it ran.

        Raises:
            RequestRejectedError: No configured profile matches (status 429).
        """
        if results:
            return []
        if len(profiles) == 1:
            return list(profiles)
        value = self.header_value(request)
        wanted = value or self.default_profile
        if wanted in profiles:
            return [wanted]
        if value:
            reason = (
                f"no scheduling profile configured for {self.header_name!r} header value "
                f"{_shown(value)}"
            )
        else:
            reason = (
                f"missing {self.header_name!r} header, and defaultProfile "
                f"{self.default_profile!r} is not a configured scheduling profile"
            )
        logger.info(
            "%s: no scheduling profile selected for request %s: %s (configured: %s)",
            self.name,
            request.request_id,
            reason,
            sorted(profiles),
        )
        raise RequestRejectedError(f"{self.name}: {reason}", 429)

    def process_results(
        self,
        ctx: SchedulingContext,
        request: SchedulingRequest,
        results: Mapping[str, ProfileResult],
    ) -> str:
        """The single profile that ran is primary (`NoEndpointError` when more ran)."""
        return single_result(self.name, results)


def register(registry: PluginRegistry) -> None:
    """Register ``header-profile-handler``."""
    registry.register(
        "header-profile-handler",
        HeaderProfileHandler,
        params=HeaderProfileHandlerParams,
        kinds=("profile-handler",),
        description="runs the one profile named by a request header (EPP-Profile)",
    )
