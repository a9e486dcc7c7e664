"""A small HTTP/1.1 ``GET`` over one kept-alive socket, for the pods' metrics pages.

A scrape needs the status, the body's framing (``Content-Length``, ``chunked`` or read to close)
and whether the pod closes the connection, nothing else. ``http.client`` parsed every response
head with the ``email`` package, which was most of a scrape's CPU (each pod is scraped up to ten
times a second); this reads the head with a few byte operations.

Bounded: the head at `MAX_HEAD` bytes, the body at the connection's ``max_bytes`` (a page over
it is an error, and the connection is dropped), every socket operation at ``timeout`` seconds.
Any error closes the connection; the next request opens a new one.
"""

from __future__ import annotations

import socket

__all__ = ["MAX_HEAD", "MAX_PAGE", "PageConnection"]

#: Largest response head (status line and headers) read, in bytes.
MAX_HEAD = 64 * 1024
#: Largest page read by default, in bytes (a vLLM page is a few hundred KiB at most).
MAX_PAGE = 16 * 1024 * 1024

_RECV = 65536


class PageConnection:
    """One keep-alive connection to ``host:port`` serving ``GET`` requests one at a time.

    Args:
        host: Address to connect to.
        port: TCP port.
        timeout: Seconds for the connect and for each send / receive.
        max_bytes: Largest body accepted.
    """

    def __init__(self, host: str, port: int, timeout: float, max_bytes: int = MAX_PAGE) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._sock: socket.socket | None = None
        self._buf = bytearray()

    def close(self) -> None:
        """Drop the connection (the next `get` opens a new one)."""
        sock, self._sock = self._sock, None
        self._buf.clear()
        if sock is not None:
            sock.close()

    def get(self, path: str, accept: str = "text/plain") -> tuple[int, bytes]:
        """``GET path``: returns (status, body).

        Raises:
            OSError: Connection failure, timeout, a malformed or oversized response.
        """
        try:
            return self._get(path, accept)
        except BaseException:
            self.close()
            raise

    def _get(self, path: str, accept: str) -> tuple[int, bytes]:
        if self._sock is None:
            self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{self.port}\r\nAccept: {accept}\r\n"
            "User-Agent: kvaware-scraper\r\n\r\n".encode("latin-1")
        )
        status, length, chunked, close = self._head()
        if chunked:
            body = self._chunked()
        elif length is not None:
            if length > self.max_bytes:
                raise OSError(f"page of {length} bytes is over the {self.max_bytes}-byte limit")
            body = self._exactly(length)
        else:
            body = self._to_close()
            close = True
        if close or self._buf:
            self.close()  # a pod that closes, or bytes beyond the answer: start afresh
        return status, body

    # -- reading --------------------------------------------------------------------------------

    def _fill(self) -> bool:
        """Receive more bytes into the buffer; False at the end of the stream."""
        assert self._sock is not None
        data = self._sock.recv(_RECV)
        if not data:
            return False
        self._buf += data
        return True

    def _head(self) -> tuple[int, int | None, bool, bool]:
        """(status, Content-Length or None, chunked, the connection closes after)."""
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self._buf) > MAX_HEAD:
                raise OSError(f"response head over {MAX_HEAD} bytes")
            if not self._fill():
                raise OSError("connection closed before a response")
        head = bytes(self._buf[:end])
        del self._buf[: end + 4]
        lines = head.split(b"\r\n")
        parts = lines[0].split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise OSError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
        status = int(parts[1])
        close = parts[0] == b"HTTP/1.0"
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise OSError(f"malformed header line {line[:80]!r}")
            key = name.strip().lower()
            value = value.strip().lower()
            if key == b"content-length":
                if not value.isdigit():
                    raise OSError(f"bad Content-Length {value[:40]!r}")
                length = int(value)
            elif key == b"transfer-encoding":
                chunked = value.endswith(b"chunked")
            elif key == b"connection":
                close = b"close" in value or (close and b"keep-alive" not in value)
        return status, length, chunked, close

    def _exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not self._fill():
                raise OSError("connection closed inside the body")
        body = bytes(self._buf[:n])
        del self._buf[:n]
        return body

    def _line(self) -> bytes:
        while True:
            end = self._buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 2]
                return line
            if len(self._buf) > MAX_HEAD:
                raise OSError("chunk header line too long")
            if not self._fill():
                raise OSError("connection closed inside the body")

    def _chunked(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            size_text = self._line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise OSError(f"bad chunk size {size_text[:40]!r}") from None
            if size == 0:
                while self._line():  # trailers, up to the blank line
                    pass
                return b"".join(parts)
            total += size
            if total > self.max_bytes:
                raise OSError(f"page over the {self.max_bytes}-byte limit")
            parts.append(self._exactly(size))
            if self._exactly(2) != b"\r\n":
                raise OSError("chunk not followed by CRLF")

    def _to_close(self) -> bytes:
        while self._fill():
            if len(self._buf) > self.max_bytes:
                raise OSError(f"page over the {self.max_bytes}-byte limit")
        body = bytes(self._buf)
        self._buf.clear()
        return body
