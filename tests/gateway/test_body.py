"""Compressed request bodies: decoded exactly, and never past the limit."""

from __future__ import annotations

import gzip
import os
import zlib

import pytest

from kvaware_scorer.gateway.body import decode_body
from kvaware_scorer.gateway.protocol import APIError

MIB = 1 << 20


@pytest.mark.parametrize("size", [0, 1, 1000, MIB - 1, MIB, MIB + 1, 3 * MIB + 17])
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate"])
def test_decoded_exactly_up_to_the_limit(size: int, encoding: str) -> None:
    """Bodies decode to their original bytes at a limit of exactly their size, and a limit one
    byte smaller is a 413 (zlib, raw deflate and gzip)."""
    raw = os.urandom(size // 2) + bytes(size - size // 2)
    if encoding == "gzip":
        data = gzip.compress(raw)
    elif encoding == "deflate":
        data = zlib.compress(raw)
    else:
        data, encoding = zlib.compress(raw)[2:-4], "deflate"
    assert decode_body(data, encoding, size) == raw
    if size:
        with pytest.raises(APIError) as err:
            decode_body(data, encoding, size - 1)
        assert err.value.status == 413


def test_gzip_members_encodings_and_garbage() -> None:
    """Several gzip members are concatenated; identity passes through; unknown encodings are
    415; truncated or invalid data is 400."""
    assert decode_body(gzip.compress(b"ab") + gzip.compress(b"cd"), "gzip", 10) == b"abcd"
    assert decode_body(b"as is", "identity", 1) == b"as is"
    assert decode_body(b"as is", None, 1) == b"as is"
    for data, encoding, status in (
        (b"x", "br", 415),
        (gzip.compress(b"hello" * 100)[:-12], "gzip", 400),
        (b"\x1f\x8b\x08\x00nonsense", "x-gzip", 400),
        (b"\x78\x9c\xff\xff", "deflate", 400),
    ):
        with pytest.raises(APIError) as err:
            decode_body(data, encoding, 1 << 20)
        assert err.value.status == status, (data, encoding)
