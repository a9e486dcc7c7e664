"""Compressed request bodies, decoded incrementally within the body cap.

A ``Content-Encoding: gzip`` (or ``x-gzip``, ``deflate``) body is inflated piece by piece and
never beyond ``maxBodyBytes``: a small body that would inflate to gigabytes stops at the cap
(413) having produced at most the cap, and a body that is not valid compressed data is a 400.
"""

from __future__ import annotations

import zlib

from kvaware_scorer.gateway.protocol import APIError

__all__ = ["ENCODINGS", "decode_body"]

#: Content encodings the gateway decodes (``identity`` = none).
ENCODINGS = frozenset({"identity", "gzip", "x-gzip", "deflate"})
#: Compressed bytes fed to the decompressor at a time.
_PIECE = 1 << 16
#: Inflated bytes produced at a time (zlib builds each output twice over: small steps keep a
#: body's peak memory near what it inflates to).
_STEP = 1 << 20


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"The request body exceeds the limit of {limit} bytes once decompressed.",
        code="request_too_large",
    )


def _invalid(encoding: str, detail: str) -> APIError:
    return APIError(
        400,
        f"The request body is not valid {encoding} data: {detail}",
        code="invalid_encoding",
    )


def _decompressor(encoding: str, head: bytes) -> zlib._Decompress:
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(wbits=31)
    # NOTE: HTTP's "deflate" is the zlib format, but clients also send raw deflate (as
    # browsers once did); a zlib header is recognised by its checksum.
    zlib_header = len(head) >= 2 and head[0] & 0x0F == 8 and int.from_bytes(head[:2]) % 31 == 0
    return zlib.decompressobj(wbits=15 if zlib_header else -15)


def decode_body(data: bytes, encoding: str | None, limit: int) -> bytes:
    """`data` decoded according to its ``Content-Encoding``, at most `limit` bytes.

    Args:
        data: The body as received.
        encoding: The ``Content-Encoding`` header (None or ``identity`` = as is).
        limit: Largest decoded body.

    Raises:
        APIError: 413 when the decoded body exceeds `limit`, 400 when `data` is not valid
            for `encoding`, 415 for an encoding the gateway does not decode.
    """
    name = (encoding or "identity").strip().lower()
    if name in ("", "identity"):
        return data
    if name not in ENCODINGS:
        raise APIError(
            415,
            f"Content-Encoding {encoding!r} is not supported; use gzip or deflate.",
            code="unsupported_encoding",
        )
    out: list[bytes] = []
    size = 0
    pos = 0
    d = _decompressor(name, data[:2])
    try:
        while True:
            piece = d.unconsumed_tail or data[pos : pos + _PIECE]
            if not d.unconsumed_tail:
                pos += len(piece)
            # NOTE: with the input used up, output held back by the step bound may remain.
            chunk = d.decompress(piece, min(_STEP, limit - size + 1))
            if not piece and not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            out.append(chunk)
            if d.eof:
                rest = d.unused_data + data[pos:]
                if not rest or name not in ("gzip", "x-gzip"):
                    break
                # NOTE: a gzip body may hold several members, decoded one after another.
                data, pos = rest, 0
                d = _decompressor(name, rest[:2])
        if not d.eof:
            raise _invalid(name, "the compressed data is truncated")
    except zlib.error as exc:
        raise _invalid(name, str(exc)) from None
    return b"".join(out)
