"""Reading ``usage`` from answers as they pass through the EPP, chunk by chunk."""

from __future__ import annotations

import json

from kvaware_scorer.epp.wire import UsageReader, endpoint_id

USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 8}}


def test_sse_usage_split_across_chunks() -> None:
    """An SSE event carrying usage, cut anywhere across chunks, is read once it is complete."""
    event = b'data: {"choices": [], "usage": ' + json.dumps(USAGE).encode() + b"}\n\n"
    stream = b'data: {"choices": [{"text": "usage"}]}\n\n' + event + b"data: [DONE]\n\n"
    for cut in range(1, len(stream), 7):
        r = UsageReader(1024)
        r.sse = True
        r.feed(stream[:cut])
        r.feed(stream[cut:])
        u = r.close()
        assert u is not None and (u.prompt_tokens, u.completion_tokens) == (11, 3)
        assert u.prompt_tokens_details is not None
        assert u.prompt_tokens_details.cached_tokens == 8


def test_long_json_answer_keeps_only_its_end() -> None:
    """A JSON answer longer than the limit is read from its last bytes (usage is at the end)."""
    answer = json.dumps(
        {"choices": [{"text": "x" * 100_000}], "usage": USAGE, "kv_transfer_params": None}
    ).encode()
    r = UsageReader(4096)
    for i in range(0, len(answer), 1000):
        r.feed(answer[i : i + 1000])
    u = r.close()
    assert u is not None and u.completion_tokens == 3
    short = UsageReader(4096)
    short.feed(json.dumps({"usage": USAGE}).encode())
    assert short.close() is not None
    none = UsageReader(4096)
    none.feed(b'{"choices": []}')
    assert none.close() is None


def test_endpoint_ids() -> None:
    """Destination strings become pod ids (IPv6 brackets dropped)."""
    assert endpoint_id("10.0.0.1:8000") == "10.0.0.1:8000"
    assert endpoint_id("[fd00::1]:8000") == "fd00::1:8000"
