"""Filters: ``decode-filter``, ``prefill-filter``, ``encode-filter`` (``llm-d.ai/role``) and ``label-selector-filter`` (Kubernetes
label selector semantics; also the deprecated ``by-label`` form)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field, model_validator

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.scheduler import (
    Endpoint,
    PluginContext,
    PluginRegistry,
    SchedulingContext,
    SchedulingRequest,
)

__all__ = [
    "DECODE_ROLES",
    "ENCODE_ROLES",
    "PREFILL_ROLES",
    "ROLE_LABEL",
    "DecodeFilter",
    "LabelSelectorFilter",
    "LabelSelectorParams",
    "MatchExpression",
    "RoleFilter",
    "register",
]

ROLE_LABEL = "llm-d.ai/role"
#: Roles that can decode (upstream ``…/filter/bylabel/roles.go``); unlabeled pods pass too.
DECODE_ROLES = frozenset({"decode", "prefill-decode", "both", "encode-prefill-decode"})
#: Roles that can prefill; unlabeled pods do not pass (upstream).
PREFILL_ROLES = frozenset(
    {"prefill", "encode-prefill", "prefill-decode", "both", "encode-prefill-decode"}
)
#: Roles that can encode; unlabeled pods do not pass (upstream).
ENCODE_ROLES = frozenset({"encode", "encode-prefill", "encode-prefill-decode"})


class DecodeFilter:
    """``decode-filter``: keeps endpoints whose ``llm-d.ai/role`` label is ``decode``,
    ``prefill-decode``, ``both`` or ``encode-prefill-decode``, and endpoints without the label."""

    def __init__(self, params: object, ctx: PluginContext) -> None:
        self.name = ctx.name

    def filter(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        out: list[Endpoint] = []
        for e in endpoints:
            role = e.labels.get(ROLE_LABEL)
            if role is None or role in DECODE_ROLES:
                out.append(e)
        return out


class RoleFilter:
    """``prefill-filter`` / ``encode-filter``: keeps endpoints whose ``llm-d.ai/role`` label
    names a role that can do the stage; endpoints without the label are dropped."""

    def __init__(self, params: object, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.roles = PREFILL_ROLES if ctx.type == "prefill-filter" else ENCODE_ROLES

    def filter(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        roles = self.roles
        return [e for e in endpoints if e.labels.get(ROLE_LABEL) in roles]


class MatchExpression(ConfigModel):
    """One requirement of a label selector.

    Attributes:
        key: Label key.
        operator: ``In``, ``NotIn``, ``Exists`` or ``DoesNotExist``.
        values: Values for ``In`` / ``NotIn`` (non-empty); empty for the others.
    """

    key: str = Field(min_length=1)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _values_match_operator(self) -> MatchExpression:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs a non-empty 'values'")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no 'values'")
        return self

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether `labels` satisfy this requirement (NotIn passes when the key is absent)."""
        op = self.operator
        if op == "Exists":
            return self.key in labels
        if op == "DoesNotExist":
            return self.key not in labels
        value = labels.get(self.key)
        if op == "In":
            return value is not None and value in self.values
        return value is None or value not in self.values


class LabelSelectorParams(ConfigModel):
    """Parameters of ``label-selector-filter``.

    Attributes:
        match_labels: Every key must be present with exactly this value.
        match_expressions: Every requirement must hold.
        label: Deprecated ``by-label`` form: the label to test.
        valid_values: Deprecated ``by-label`` form: accepted values of `label`.
        allows_no_label: Deprecated ``by-label`` form: endpoints without `label` pass.
    """

    match_labels: dict[str, str] = Field(default_factory=dict)
    match_expressions: list[MatchExpression] = Field(default_factory=list)
    label: str | None = None
    valid_values: list[str] = Field(default_factory=list)
    allows_no_label: bool = False

    @model_validator(mode="after")
    def _legacy_needs_label(self) -> LabelSelectorParams:
        if self.label is None and (self.valid_values or self.allows_no_label):
            raise ValueError("validValues/allowsNoLabel need 'label'")
        return self


class LabelSelectorFilter:
    """``label-selector-filter``: keeps endpoints whose labels match the selector (all of
    ``matchLabels`` and ``matchExpressions``; an empty selector keeps everything)."""

    def __init__(self, params: LabelSelectorParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.match_labels = dict(params.match_labels)
        self.expressions = list(params.match_expressions)
        self.label = params.label
        self.valid_values = frozenset(params.valid_values)
        self.allows_no_label = params.allows_no_label

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether an endpoint with `labels` passes."""
        for k, v in self.match_labels.items():
            if labels.get(k) != v:
                return False
        for expr in self.expressions:
            if not expr.matches(labels):
                return False
        if self.label is not None:
            value = labels.get(self.label)
            if value is None:
                return self.allows_no_label
            return value in self.valid_values
        return True

    def filter(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        return [e for e in endpoints if self.matches(e.labels)]


def register(registry: PluginRegistry) -> None:
    """Register the filters and the ``by-label`` / ``by-label-selector`` aliases."""
    registry.register("decode-filter", DecodeFilter, description="endpoints that can decode")
    registry.register("prefill-filter", RoleFilter, description="endpoints that can prefill")
    registry.register("encode-filter", RoleFilter, description="endpoints that can encode")
    registry.register(
        "label-selector-filter",
        LabelSelectorFilter,
        params=LabelSelectorParams,
        description="endpoints whose labels match a selector",
    )
    registry.register_alias("by-label", "label-selector-filter")
    registry.register_alias("by-label-selector", "label-selector-filter")
