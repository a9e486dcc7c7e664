"""Server-sent events as the gateway relays them: cutting a pod's byte stream at event
boundaries, spotting the ``data: [DONE]`` sentinel and the ``usage`` an event carries, and the
final error event a broken-off stream ends with.

Pure byte handling (no I/O): `kvaware_scorer.gateway.relay` feeds it what the pod sends.
"""

from __future__ import annotations

import msgspec

from kvaware_scorer.gateway.accounting import Usage, usage_of_events
from kvaware_scorer.gateway.protocol import error_body

__all__ = ["MAX_HELD", "SSEFramer", "ends_stream", "sse_error"]

#: Largest incomplete SSE event held back; a pod that never ends its events is relayed as is.
MAX_HELD = 1 << 20


def ends_stream(events: bytes) -> bool:
    """Whether SSE data starting at an event boundary holds the ``data: [DONE]`` sentinel.

    NOTE: a line of its own, not the bytes anywhere: generated text may contain "[DONE]" (even
    "data: [DONE]"), and JSON escapes its newlines, so only a real line starts with it.
    """
    if b"[DONE]" not in events:  # the common case, one scan (every relayed chunk)
        return False
    for sentinel in (b"data: [DONE]", b"data:[DONE]"):
        if events.startswith(sentinel) or b"\n" + sentinel in events:
            return True
    return False


def sse_error(message: str, status: int, torn: bool) -> bytes:
    """A final SSE error event (OpenAI error shape) and ``[DONE]``; `torn`: the bytes relayed
    so far end inside an event, which the leading blank line closes."""
    err = error_body(message, "server_error", None, status)
    return (
        (b"\n\n" if torn else b"") + b"data: " + msgspec.json.encode(err) + b"\n\ndata: [DONE]\n\n"
    )


class SSEFramer:
    """Cuts one SSE stream into runs of complete events, chunk by chunk.

    Only an incomplete trailing event is held (at most `MAX_HELD` bytes), until its end
    arrives, so a pod dying mid-event never leaves a torn event at the client.

    Attributes:
        done: ``data: [DONE]`` was relayed.
        torn: The bytes relayed so far end inside an event (only past `MAX_HELD`).
        usage: The last ``usage`` seen in a relayed event.
    """

    __slots__ = ("done", "held", "torn", "usage")

    def __init__(self) -> None:
        self.held = b""
        self.done = False
        self.torn = False
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> bytes:
        """The complete events to relay now, given the next (non-empty) chunk; b"" when the
        chunk only continues an event still incomplete."""
        if self.held:
            chunk = self.held + chunk
            self.held = b""
        cut = chunk.rfind(b"\n\n")
        end = cut + 2 if cut >= 0 else 0
        if end == 0:
            cut = chunk.rfind(b"\r\n\r\n")
            end = cut + 4 if cut >= 0 else 0
        if end == len(chunk):
            self.torn = False
        elif end == 0 and len(chunk) > MAX_HELD:
            self.torn = True  # a pod that never ends its events: relay it as it is
        else:
            self.held = chunk[end:]
            if end == 0:
                return b""
            chunk = chunk[:end]
            self.torn = False
        if b'"usage"' in chunk:
            self.usage = usage_of_events(chunk) or self.usage
        if not self.done and ends_stream(chunk):
            self.done = True
        return chunk

    def finish(self) -> bytes:
        """At the end of the pod's stream: the held bytes when they carry ``[DONE]`` (to relay),
        else b"" (an unfinished event is dropped)."""
        if self.held and ends_stream(self.held):
            self.done = True
            return self.held
        return b""
