"""Disaggregated serving at the scheduling level (upstream llm-d's ``disagg`` plugins).

``disagg-profile-handler`` runs the ``decode`` profile, then, when a *decider* approves, the
``encode`` and ``prefill`` profiles; the decode pick is the primary target and the result carries
every pick. Its pre-request hook (and the older ``disagg-headers-handler`` /
``prefill-header-handler``) puts the headers llm-d's routing sidecar on the decode pod reads into
`SchedulingResult.headers`: ``x-prefiller-host-port`` (the prefill pick's ``ip:port``) and
``x-encoder-hosts-ports`` (the encode picks, comma-separated). The gateway and the EPP send them
with the request; running the prefill and moving the KV cache stays with vLLM and the sidecar.

Deciders (role ``decider``, method ``disaggregate``): ``always-disagg-pd-decider``,
``prefix-based-pd-decider`` (prefill when the decode pick would have at least ``nonCachedTokens``
uncached prompt tokens), ``always-disagg-multimodal-decider`` (encode when the request carries
images, audio or video). ``pd-profile-handler`` is the older P/D-only handler.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import Field, field_validator, model_validator

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.errors import ConfigError, KVAwareError, NoEndpointError
from kvaware_scorer.scheduler import (
    DATA_PARALLEL_HEADER,
    ENCODER_HEADER,
    PEER_ENDPOINT_KEY,
    PREFILL_HEADER,
    Endpoint,
    PluginContext,
    PluginRegistry,
    ProfileResult,
    ProfileView,
    SchedulingContext,
    SchedulingRequest,
    SchedulingResult,
)
from kvaware_scorer.scheduler.matchinfo import MatchInfoProducer, find_prefix_source

__all__ = [
    "DATA_PARALLEL_HEADER",
    "ENCODER_HEADER",
    "PREFILL_HEADER",
    "AlwaysDisaggMultimodalDecider",
    "AlwaysDisaggPDDecider",
    "Decider",
    "DisaggHeadersHandler",
    "DisaggProfileHandler",
    "PdProfileHandler",
    "PrefixBasedPDDecider",
    "has_multimodal_content",
    "register",
]

logger = logging.getLogger(__name__)

#: Content-part types that carry media (OpenAI chat, Anthropic messages).
_MEDIA_PARTS = frozenset(
    {"image_url", "input_image", "image", "video_url", "input_video", "input_audio", "audio_url"}
)


@runtime_checkable
class Decider(Protocol):
    """Decides per request whether a disaggregated stage (prefill, encode) runs."""

    def disaggregate(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoint: Endpoint | None
    ) -> bool:
        """Whether to run the stage, given the decode pick (None in prefill-first order)."""
        ...


def _host_port(e: Endpoint) -> str:
    return f"[{e.address}]:{e.port}" if ":" in e.address else f"{e.address}:{e.port}"


def has_multimodal_content(request: SchedulingRequest) -> bool:
    """Whether a chat request carries images, audio or video parts."""
    for msg in request.messages or ():
        content = msg.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping) and part.get("type") in _MEDIA_PARTS:
                    return True
    return False


def set_disagg_headers(result: SchedulingResult, prefill_profile: str, encode_profile: str) -> None:
    """Put (or clear) the prefill and encode headers from the result's profile picks."""
    result.headers.pop(PREFILL_HEADER, None)
    result.headers.pop(ENCODER_HEADER, None)
    prefill = result.profile_target(prefill_profile)
    if prefill is not None:
        result.headers[PREFILL_HEADER] = _host_port(prefill)
    encode = result.profile_results.get(encode_profile)
    if encode is not None and encode.targets:
        result.headers[ENCODER_HEADER] = ",".join(_host_port(e) for e in encode.targets)


# -- deciders ------------------------------------------------------------------------------------


class AlwaysDisaggPDDecider:
    """``always-disagg-pd-decider``: every request gets a prefill stage."""

    def __init__(self, params: object, ctx: PluginContext) -> None:
        self.name = ctx.name

    def disaggregate(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoint: Endpoint | None
    ) -> bool:
        return True


class AlwaysDisaggMultimodalDecider:
    """``always-disagg-multimodal-decider``: requests with media get an encode stage."""

    def __init__(self, params: object, ctx: PluginContext) -> None:
        self.name = ctx.name

    def disaggregate(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoint: Endpoint | None
    ) -> bool:
        return has_multimodal_content(request)


class PrefixBasedPDParams(ConfigModel):
    """Parameters of ``prefix-based-pd-decider``.

    Attributes:
        non_cached_tokens: Prefill runs when the decode pick would compute at least this many
            prompt tokens itself (prompt tokens minus its cached prefix); 0 disables P/D.
        prompt_tokens: Prompts shorter than this never get a prefill stage (0 = no minimum).
        prefix_match_info_producer_name: The prefix plugin whose match info says what the
            decode pick holds; empty = ``approx-prefix-cache-producer`` when configured (as
            upstream), else the one prefix plugin configured.
    """

    non_cached_tokens: int = Field(0, ge=0)
    prompt_tokens: int = Field(0, ge=0)
    prefix_match_info_producer_name: str | None = None


class PrefixBasedPDDecider:
    """``prefix-based-pd-decider``: prefill when the uncached part of the prompt on the decode
    pick is at least ``nonCachedTokens`` (and the prompt at least ``promptTokens``)."""

    def __init__(self, params: PrefixBasedPDParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.non_cached_tokens = params.non_cached_tokens
        self.prompt_tokens = params.prompt_tokens
        self.producer_name = params.prefix_match_info_producer_name
        self._scheduler = ctx.scheduler
        self._source: MatchInfoProducer | None = None
        self._resolved = False

    def _producer(self, ctx: SchedulingContext) -> MatchInfoProducer | None:
        if not self._resolved:
            self._resolved = True
            sched = ctx.scheduler or self._scheduler
            if sched is not None:
                self._source = find_prefix_source(
                    sched.plugins, sched.config, self.producer_name, self.name
                )
        return self._source

    def disaggregate(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoint: Endpoint | None
    ) -> bool:
        if self.non_cached_tokens == 0 or endpoint is None:
            return False
        source = self._producer(ctx)
        matched_tokens = 0.0
        n_tokens = len(request.tokens(list)) if request.has_tokens else 0
        if source is not None:
            try:
                matched, total, block_size = source.match_info(ctx, request, [endpoint])
            except KVAwareError:
                return False  # untokenizable: upstream sees no tokenized prompt either
            matched_tokens = matched.get(endpoint.id, 0.0) * block_size
            if not n_tokens:
                n_tokens = len(request.tokens(list)) if request.has_tokens else total * block_size
        if self.prompt_tokens and n_tokens < self.prompt_tokens:
            return False
        if n_tokens < self.non_cached_tokens:
            return False
        return n_tokens - matched_tokens >= self.non_cached_tokens


# -- profile handlers ----------------------------------------------------------------------------


class DisaggProfiles(ConfigModel):
    """Profile names of the stages (``profiles``)."""

    decode: str = "decode"
    prefill: str = "prefill"
    encode: str = "encode"


class DisaggDeciders(ConfigModel):
    """Decider plugin names (``deciders``); a stage without one never runs."""

    prefill: str | None = None
    encode: str | None = None


_LEGACY_FLAT = {
    "decodeProfile": ("profiles", "decode"),
    "prefillProfile": ("profiles", "prefill"),
    "encodeProfile": ("profiles", "encode"),
    "prefillDeciderPluginName": ("deciders", "prefill"),
    "encodeDeciderPluginName": ("deciders", "encode"),
    "deciderPluginName": ("deciders", "prefill"),
}


def _nest_legacy(params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Upstream's deprecated flat parameters -> ``profiles`` / ``deciders`` (not mixed)."""
    flat = [k for k in params if k in _LEGACY_FLAT]
    if not flat:
        return params, []
    if "profiles" in params or "deciders" in params:
        raise ConfigError(
            "use one format: nested profiles/deciders or the deprecated flat fields", flat[0]
        )
    out: dict[str, Any] = {k: v for k, v in params.items() if k not in _LEGACY_FLAT}
    warnings = []
    for key in flat:
        section, field_name = _LEGACY_FLAT[key]
        value = params[key]
        if not value:
            continue
        if key == "deciderPluginName" and "prefillDeciderPluginName" in params:
            continue
        out.setdefault(section, {})[field_name] = value
        warnings.append(f"parameter {key!r} is deprecated; use '{section}.{field_name}'")
    return out, warnings


class DisaggProfileHandlerParams(ConfigModel):
    """Parameters of ``disagg-profile-handler``.

    Attributes:
        stage_order: ``decode-first`` (default: decode, then the deciders see the decode pick)
            or ``prefill-first`` (prefill always runs, then decode; no prefill decider).
        profiles: Profile names of the decode, prefill and encode stages.
        deciders: Decider plugins of the prefill and encode stages.
    """

    stage_order: Literal["decode-first", "prefill-first"] = "decode-first"
    profiles: DisaggProfiles = Field(default_factory=DisaggProfiles)
    deciders: DisaggDeciders = Field(default_factory=DisaggDeciders)

    @field_validator("stage_order", mode="before")
    @classmethod
    def _normalize_order(cls, value: Any) -> Any:
        if isinstance(value, str):
            key = value.lower().replace("-", "").replace("_", "")
            if key in ("", "decodefirst", "decode"):
                return "decode-first"
            if key in ("prefillfirst", "prefill"):
                return "prefill-first"
        return value

    @model_validator(mode="after")
    def _no_prefill_decider_when_prefill_first(self) -> DisaggProfileHandlerParams:
        if self.stage_order == "prefill-first" and self.deciders.prefill:
            raise ValueError("a prefill decider is not supported with stageOrder prefill-first")
        return self


class _Stages:
    """Resolves decider plugins by name from the scheduler, on first use."""

    def __init__(self, ctx: PluginContext) -> None:
        self._scheduler = ctx.scheduler

    def decider(self, ctx: SchedulingContext, name: str | None) -> Decider | None:
        if not name:
            return None
        sched = ctx.scheduler or self._scheduler
        obj = sched.plugins.get(name) if sched is not None else None
        if not isinstance(obj, Decider):
            raise ConfigError(f"{name!r} is not a configured decider plugin")
        return obj


class _DecodePrimary:
    """Shared by the P/D profile handlers: the decode profile's result is the primary."""

    decode: str

    def process_results(
        self,
        ctx: SchedulingContext,
        request: SchedulingRequest,
        results: Mapping[str, ProfileResult],
    ) -> str:
        if self.decode not in results:
            raise NoEndpointError("failed to find available decode workers")
        return self.decode


class DisaggProfileHandler(_DecodePrimary):
    """``disagg-profile-handler`` (see the module docstring)."""

    def __init__(self, params: DisaggProfileHandlerParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.stage_order = params.stage_order
        self.decode = params.profiles.decode
        self.prefill = params.profiles.prefill
        self.encode = params.profiles.encode
        self.prefill_decider = params.deciders.prefill
        self.encode_decider = params.deciders.encode
        self._stages = _Stages(ctx)

    def _skipped(self, request: SchedulingRequest, results: Mapping[str, object]) -> set[str]:
        key = self.name + ":skipped"
        if not results or key not in request.state:
            request.state[key] = set()
        skipped: set[str] = request.state[key]
        return skipped

    def _maybe(
        self,
        ctx: SchedulingContext,
        request: SchedulingRequest,
        profiles: Mapping[str, ProfileView],
        results: Mapping[str, ProfileResult],
        stage: str,
        decider: str | None,
        endpoint: Endpoint | None,
    ) -> bool:
        """Whether `stage` should run now (decided once per request)."""
        skipped = self._skipped(request, results)
        if stage not in profiles or stage in results or stage in skipped:
            return False
        d = self._stages.decider(ctx, decider)
        if d is not None and d.disaggregate(ctx, request, endpoint):
            return True
        skipped.add(stage)
        return False

    def pick_profiles(
        self,
        ctx: SchedulingContext,
        request: SchedulingRequest,
        profiles: Mapping[str, ProfileView],
        results: Mapping[str, ProfileResult],
    ) -> list[str]:
        self._skipped(request, results)
        if not results:
            request.state.pop(PEER_ENDPOINT_KEY, None)
        if self.stage_order == "prefill-first":
            return self._prefill_first(ctx, request, profiles, results)
        if self.decode not in results:
            return [self.decode] if self.decode in profiles else []
        decoded = results[self.decode].targets
        if not decoded:
            return []
        for stage, decider in (
            (self.encode, self.encode_decider),
            (self.prefill, self.prefill_decider),
        ):
            if self._maybe(ctx, request, profiles, results, stage, decider, decoded[0]):
                if stage == self.prefill:
                    # upstream: the prefill profile sees the decode pick (topology affinity)
                    request.state[PEER_ENDPOINT_KEY] = decoded[0]
                return [stage]
        return []

    def _prefill_first(
        self,
        ctx: SchedulingContext,
        request: SchedulingRequest,
        profiles: Mapping[str, ProfileView],
        results: Mapping[str, ProfileResult],
    ) -> list[str]:
        if self.decode in results:
            return []
        if self.prefill in profiles and self.prefill not in results:
            return [self.prefill]
        if self._maybe(ctx, request, profiles, results, self.encode, self.encode_decider, None):
            return [self.encode]
        prefilled = results.get(self.prefill)
        if prefilled is not None and prefilled.targets:
            # upstream: the decode profile sees the prefill pick (topology affinity)
            request.state[PEER_ENDPOINT_KEY] = prefilled.targets[0]
        return [self.decode] if self.decode in profiles else []

    def pre_request(
        self, ctx: SchedulingContext, request: SchedulingRequest, result: SchedulingResult
    ) -> None:
        """Headers for the decode pod's sidecar: the prefill pick and the encode picks."""
        set_disagg_headers(result, self.prefill, self.encode)


class PdProfileHandlerParams(ConfigModel):
    """Parameters of ``pd-profile-handler`` (upstream's older P/D handler).

    Attributes:
        decode_profile: The decode profile's name.
        prefill_profile: The prefill profile's name.
        decider_plugin_name: The decider; default ``prefix-based-pd-decider`` when one is
            configured, else the handler's older built-in rule (`threshold`).
        threshold: Older built-in rule (before deciders): 0 runs prefill for every request;
            > 0 runs it when the uncached part of the prompt is at least this many characters
            (uncached tokens x 4 here; upstream counted prompt characters).
        hash_block_size: Older built-in rule: accepted (block sizes come from the prefix
            plugin here).
        primary_port: Deprecated: when set, ``x-data-parallel-host-port`` names the decode pick
            (the request itself still goes to the pick's own port here).
        prefix_plugin_type: Deprecated, ignored.
        prefix_plugin_name: Deprecated, ignored (the decider finds its prefix plugin).
        prefix_match_info_producer_name: Ignored here (the decider finds its prefix plugin).
    """

    decode_profile: str = "decode"
    prefill_profile: str = "prefill"
    decider_plugin_name: str | None = None
    threshold: int = Field(0, ge=0)
    hash_block_size: int | None = Field(None, ge=1)
    primary_port: int = Field(0, ge=0, le=65535)
    prefix_plugin_type: str | None = None
    prefix_plugin_name: str | None = None
    prefix_match_info_producer_name: str | None = None


class PdProfileHandler(_DecodePrimary):
    """``pd-profile-handler``: decode, then prefill when the decider approves."""

    def __init__(self, params: PdProfileHandlerParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.decode = params.decode_profile
        self.prefill = params.prefill_profile
        self.decider_name = params.decider_plugin_name
        self.threshold = params.threshold
        self.primary_port = params.primary_port
        self._stages = _Stages(ctx)
        self._scheduler = ctx.scheduler
        self._legacy: PrefixBasedPDDecider | None = None
        self._always = AlwaysDisaggPDDecider(params, ctx)

    def _decider(self, ctx: SchedulingContext) -> Decider | None:
        name = self.decider_name
        sched = ctx.scheduler or self._scheduler
        if name is None and sched is not None and "prefix-based-pd-decider" in sched.plugins:
            name = "prefix-based-pd-decider"
        if name is not None:
            return self._stages.decider(ctx, name)
        if self._legacy is None:
            # NOTE: the handler's older built-in rule: threshold 0 always disaggregates.
            params = PrefixBasedPDParams(non_cached_tokens=-(-self.threshold // 4))
            plugin_ctx = PluginContext(name=self.name, type="pd-profile-handler", scheduler=sched)
            self._legacy = PrefixBasedPDDecider(params, plugin_ctx)
        return self._legacy if self.threshold else self._always

    def pick_profiles(
        self,
        ctx: SchedulingContext,
        request: SchedulingRequest,
        profiles: Mapping[str, ProfileView],
        results: Mapping[str, ProfileResult],
    ) -> list[str]:
        if self.decode not in results:
            return [self.decode]
        decoded = results[self.decode].targets
        if len(profiles) == len(results) or not decoded or self.prefill in results:
            return []
        d = self._decider(ctx)
        if d is not None and d.disaggregate(ctx, request, decoded[0]):
            return [self.prefill]
        return []

    def pre_request(
        self, ctx: SchedulingContext, request: SchedulingRequest, result: SchedulingResult
    ) -> None:
        """The data-parallel header when ``primaryPort`` is set."""
        if self.primary_port and result.targets:
            result.headers[DATA_PARALLEL_HEADER] = _host_port(result.targets[0])


def _pd_legacy(params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    warnings = ["pd-profile-handler is deprecated upstream; use disagg-profile-handler"]
    if "threshold" in params or "hashBlockSize" in params:
        warnings.append(
            "threshold / hashBlockSize are pd-profile-handler's older built-in rule (before "
            "deciders); used when no decider is named"
        )
    if params.get("primaryPort"):
        warnings.append(
            "primaryPort is deprecated upstream (not needed with Istio >= 1.28.1): only the "
            f"{DATA_PARALLEL_HEADER} header is set, the request keeps the pick's port"
        )
    return params, warnings


class DisaggHeadersParams(ConfigModel):
    """Parameters of ``disagg-headers-handler`` / ``prefill-header-handler``."""

    prefill_profile: str = "prefill"
    encode_profile: str = "encode"


class DisaggHeadersHandler:
    """``disagg-headers-handler``: sets the prefill and encode headers from the picks (upstream
    deprecated it: ``disagg-profile-handler`` does it itself)."""

    def __init__(self, params: DisaggHeadersParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.prefill = params.prefill_profile
        self.encode = params.encode_profile

    def pre_request(
        self, ctx: SchedulingContext, request: SchedulingRequest, result: SchedulingResult
    ) -> None:
        set_disagg_headers(result, self.prefill, self.encode)


def _headers_deprecated(params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    return params, [
        "disagg-headers-handler is deprecated upstream: disagg-profile-handler sets the headers"
    ]


def register(registry: PluginRegistry) -> None:
    """Register the disaggregation handlers, header handlers and deciders."""
    registry.register(
        "disagg-profile-handler",
        DisaggProfileHandler,
        params=DisaggProfileHandlerParams,
        kinds=("profile-handler", "pre-request"),
        description="decode, then prefill / encode stages when their deciders approve",
        transform=_nest_legacy,
        refs={"deciders.prefill": "decider", "deciders.encode": "decider"},
    )
    registry.register(
        "pd-profile-handler",
        PdProfileHandler,
        params=PdProfileHandlerParams,
        kinds=("profile-handler", "pre-request"),
        description="decode, then prefill when the decider approves (deprecated upstream)",
        transform=_pd_legacy,
        refs={"deciderPluginName": "decider"},
    )
    registry.register(
        "disagg-headers-handler",
        DisaggHeadersHandler,
        params=DisaggHeadersParams,
        kinds=("pre-request",),
        description="prefill / encode headers for the decode pod's sidecar (deprecated upstream)",
        transform=_headers_deprecated,
    )
    registry.register_alias("prefill-header-handler", "disagg-headers-handler")
    registry.register(
        "always-disagg-pd-decider",
        AlwaysDisaggPDDecider,
        kinds=("decider",),
        description="every request gets a prefill stage",
    )
    registry.register(
        "prefix-based-pd-decider",
        PrefixBasedPDDecider,
        params=PrefixBasedPDParams,
        kinds=("decider",),
        description="prefill when enough of the prompt is uncached on the decode pick",
    )
    registry.register(
        "always-disagg-multimodal-decider",
        AlwaysDisaggMultimodalDecider,
        kinds=("decider",),
        description="requests with images, audio or video get an encode stage",
    )
