"""``request-attribute-reporter``: upstream's parameters and checks, the ``usage`` variable as
upstream builds it (every number a double), which values are reported and where, and the
upstream configuration files that use it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler import ResponseInfo, Scheduler, SchedulingRequest

from .conftest import build, config, endpoints

CORPUS = Path(__file__).parent / "upstream_corpus" / "request-attribute-reporter.yaml"
KEY = "x-gateway-inference-request-cost"


def reporter(expression: str, condition: str = "", namespace: str = "") -> Scheduler:
    attr: dict[str, Any] = {"key": {"name": KEY}, "expression": expression}
    if namespace:
        attr["key"]["namespace"] = namespace
    if condition:
        attr["condition"] = condition
    return build(
        config(
            [
                {"type": "request-attribute-reporter", "parameters": {"attributes": [attr]}},
                {"type": "queue-scorer"},
            ],
            [{"name": "default", "plugins": [{"pluginRef": "queue-scorer"}]}],
        )
    )


def finish(s: Scheduler, info: ResponseInfo) -> dict[str, dict[str, Any]]:
    """Schedule a request, end it with `info`, return the metadata the hooks left."""
    req = SchedulingRequest("r", "m", token_ids=list(range(32)))
    result = s.schedule(req, endpoints(2))
    s.post_response(req, result, info)
    return info.dynamic_metadata


def test_total_tokens_reported_as_a_number_in_envoy_lb() -> None:
    s = reporter("usage.prompt_tokens + usage.completion_tokens")
    md = finish(s, ResponseInfo(prompt_tokens=120, completion_tokens=7))
    assert md == {"envoy.lb": {KEY: 127.0}}
    s.close()


def test_usage_is_upstreams_struct() -> None:
    """Counts are doubles (an int literal does not add to them), the three counts are always
    there (0 when not reported, as upstream), details only when reported."""
    from kvaware_scorer.plugins.attributes import usage_struct

    assert usage_struct(ResponseInfo()) == {
        "prompt_tokens": 0.0,
        "completion_tokens": 0.0,
        "total_tokens": 0.0,
    }
    full = usage_struct(
        ResponseInfo(prompt_tokens=10, completion_tokens=5, cached_tokens=8, total_tokens=16)
    )
    assert full == {
        "prompt_tokens": 10.0,
        "completion_tokens": 5.0,
        "total_tokens": 16.0,
        "prompt_tokens_details": {"cached_tokens": 8.0},
    }
    assert all(type(v) is float for k, v in full.items() if k != "prompt_tokens_details")
    s = reporter("usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens")
    assert finish(s, ResponseInfo(prompt_tokens=100, cached_tokens=64)) == {"envoy.lb": {KEY: 36.0}}
    s.close()


@pytest.mark.parametrize(
    ("expression", "condition", "info", "want"),
    [
        ("usage.completion_tokens", "has(usage.completion_tokens)", {"completion_tokens": 9}, 9),
        ("usage.total_tokens * 0.75", "", {"total_tokens": 10}, 7),
        ("-usage.total_tokens", "", {"total_tokens": 5}, -5),
        ("usage.total_tokens", "", {"prompt_tokens": 5, "completion_tokens": 3}, None),
        ("int(usage.prompt_tokens) * 2", "", {"prompt_tokens": 21}, 42),
        # upstream skips 0 and -1
        ("usage.completion_tokens", "", {"prompt_tokens": 5}, None),
        ("usage.prompt_tokens - 2.0", "", {"prompt_tokens": 1}, None),
        # the condition must be true (not merely truthy)
        ("usage.prompt_tokens", "usage.prompt_tokens > 100", {"prompt_tokens": 5}, None),
        ("usage.prompt_tokens", "usage.prompt_tokens > 100.0", {"prompt_tokens": 500}, 500),
        ("usage.prompt_tokens", "has(usage.prompt_tokens_details)", {"prompt_tokens": 5}, None),
        # a result that is no int or double reports nothing
        ("usage.prompt_tokens > 1.0", "", {"prompt_tokens": 5}, None),
        ("string(usage.prompt_tokens)", "", {"prompt_tokens": 5}, None),
        ("uint(usage.prompt_tokens)", "", {"prompt_tokens": 5}, None),
        ("usage.prompt_tokens / 0.0", "", {"prompt_tokens": 5}, None),
    ],
)
def test_what_is_reported(
    expression: str, condition: str, info: dict[str, Any], want: int | None
) -> None:
    s = reporter(expression, condition)
    md = finish(s, ResponseInfo(**info))
    assert md == ({} if want is None else {"envoy.lb": {KEY: float(want)}})
    s.close()


def test_evaluation_errors_report_nothing_count_and_log_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An int literal added to a double count fails at evaluation, as in CEL: nothing is
    reported, every failure is counted, the log gets one line per minute."""
    s = reporter("usage.prompt_tokens + 1")
    plugin = s.plugins["request-attribute-reporter"]
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert finish(s, ResponseInfo(prompt_tokens=5)) == {}
    assert plugin.failures == 3
    lines = [r for r in caplog.records if "request-attribute-reporter" in r.getMessage()]
    assert len(lines) == 1 and "no such overload: double + int" in lines[0].getMessage()
    s.close()


def test_custom_namespace_and_two_reporters_share_it() -> None:
    data = config(
        [
            {
                "name": f"r{i}",
                "type": "request-attribute-reporter",
                "parameters": {
                    "attributes": [
                        {"key": {"namespace": "costs", "name": f"k{i}"}, "expression": expr}
                    ]
                },
            }
            for i, expr in enumerate(["usage.prompt_tokens", "usage.completion_tokens"])
        ]
        + [{"type": "queue-scorer"}],
        [{"name": "default", "plugins": [{"pluginRef": "queue-scorer"}]}],
    )
    s = build(data)
    md = finish(s, ResponseInfo(prompt_tokens=3, completion_tokens=4))
    assert md == {"costs": {"k0": 3.0, "k1": 4.0}}
    s.close()


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ([], "exactly one entry"),
        (
            [{"key": {"name": "a"}, "expression": "1"}, {"key": {"name": "b"}, "expression": "2"}],
            "exactly one entry",
        ),
        ([{"key": {"namespace": "envoy.lb"}, "expression": "1"}], "key.name cannot be empty"),
        ([{"key": {"name": "a"}}], "expression cannot be empty"),
        ([{"key": {"name": "a"}, "expression": "usage.prompt_tokens +"}], "failed to compile"),
        ([{"key": {"name": "a"}, "expression": "request.x"}], "undeclared reference"),
        (
            [{"key": {"name": "a"}, "expression": "1", "condition": "1 + 1.0"}],
            "condition: failed to compile",
        ),
    ],
)
def test_upstream_parameter_checks(attributes: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        build(
            config(
                [
                    {
                        "type": "request-attribute-reporter",
                        "parameters": {"attributes": attributes},
                    },
                    {"type": "queue-scorer"},
                ]
            )
        )
    assert "plugins[0].parameters.attributes" in str(err.value)


def test_upstream_config_loads_and_reports() -> None:
    """Upstream's integration-test config (the reporter listed in the profile) and its README's
    reporter build a scheduler whose two reporters both run."""
    s = build(CORPUS.read_text())
    md = finish(s, ResponseInfo(prompt_tokens=100, completion_tokens=20, total_tokens=120))
    assert md == {"envoy.lb": {KEY: 20.0, KEY + "-total": 120.0}}
    s.close()
