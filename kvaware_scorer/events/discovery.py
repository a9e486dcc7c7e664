"""Where a vLLM server's KV-event publishers are: its ``GET /kv_event_sources`` answer, checked.

The answer comes from a pod, so it is treated as hostile: no redirects are followed, the whole
request has one deadline (a server trickling one byte a second cannot stretch it), the body is
read up to a byte bound, at most a bounded number of DP ranks is taken, and only ``tcp://``
endpoints on the pod's own host (or a host the operator allowed) are ever dialed.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import time
import urllib.parse
from collections.abc import Collection
from typing import Any, Final

__all__ = ["fetch_event_sources", "parse_event_sources"]

#: Hosts of an endpoint bound on every interface (a dialer needs the pod's address instead).
_WILDCARD_HOSTS: Final = frozenset({"*", "0.0.0.0", "::", "[::]"})


def _split_tcp(endpoint: str) -> tuple[str, int]:
    """``tcp://host:port`` -> (host without brackets, port).

    Raises:
        ValueError: Not a tcp endpoint with a port.
    """
    if not endpoint.startswith("tcp://"):
        raise ValueError(f"endpoint {endpoint!r} is not tcp://")
    addr, sep, port = endpoint[len("tcp://") :].rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint {endpoint!r} has no port to dial")
    return addr.strip("[]"), int(port)


def _same_host(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a.lower() == b.lower()


def _dialable(endpoint: str, host: str, allowed: Collection[str]) -> str:
    """`endpoint` as we dial it: a wildcard host becomes `host`; any other host must be `host`
    or in `allowed` (``"*"`` allows every host).

    Raises:
        ValueError: Not tcp, no port, or a host that is neither the pod's nor allowed.
    """
    addr, port = _split_tcp(endpoint)
    if addr in _WILDCARD_HOSTS:
        addr = host
    elif not _same_host(addr, host) and "*" not in allowed and addr not in allowed:
        raise ValueError(f"endpoint {endpoint!r} is not on the pod's host {host}")
    name = f"[{addr}]" if ":" in addr else addr
    return f"tcp://{name}:{port}"


def parse_event_sources(
    sources: Any,
    host: str,
    *,
    allowed_hosts: Collection[str] = (),
    max_ranks: int = 64,
) -> dict[int, tuple[str, str | None]]:
    """DP rank -> (publisher, replay endpoint) from vLLM's ``GET /kv_event_sources`` answer.

    vLLM (>= 0.33) serves ``{dp_rank: KVEventsConfig}`` with the endpoints its publishers
    actually bound (``tcp://*:0`` resolved to the node's address and a random port; each rank
    already offset). Wildcard hosts are replaced by `host`; ranks whose events are off or not
    published over ZMQ are left out.

    Args:
        sources: The decoded JSON answer.
        host: The pod's address (for wildcard hosts, and the only host dialed by default).
        allowed_hosts: Other hosts the endpoints may name (``"*"``: any).
        max_ranks: Most ranks accepted.

    Raises:
        ValueError: An answer that is not such a map, more than `max_ranks` ranks, or an
            endpoint that is not ``tcp://`` on an allowed host with a port.
    """
    if not isinstance(sources, dict):
        raise ValueError("expected a map of DP rank -> KV-events config")
    if len(sources) > max_ranks:
        raise ValueError(f"{len(sources)} ranks listed (at most {max_ranks} accepted)")
    out: dict[int, tuple[str, str | None]] = {}
    for key, cfg in sources.items():
        if not isinstance(cfg, dict) or not str(key).isdigit() or len(str(key)) > 6:
            raise ValueError(f"unexpected entry {str(key)[:40]!r} in the event sources")
        if not cfg.get("enable_kv_cache_events") or cfg.get("publisher") not in (None, "zmq"):
            continue
        endpoint, replay = cfg.get("endpoint"), cfg.get("replay_endpoint")
        if not isinstance(endpoint, str) or not isinstance(replay, str | None):
            raise ValueError(f"rank {key}: endpoints must be strings")
        out[int(key)] = (
            _dialable(endpoint, host, allowed_hosts),
            None if replay is None else _dialable(replay, host, allowed_hosts),
        )
    return out


def _read_bounded(base_url: str, path: str, timeout: float, max_bytes: int) -> bytes:
    """GET `path` of `base_url` within `timeout` seconds in total, at most `max_bytes` read.

    Raises:
        OSError: Unreachable, an HTTP status other than 200 (redirects included), too slow,
            or too large.
    """
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        raise OSError(f"cannot ask {base_url!r} (only http://host:port)")
    deadline = time.monotonic() + timeout

    def left() -> float:
        rest = deadline - time.monotonic()
        if rest <= 0:
            raise TimeoutError(f"{base_url}{path}: no complete answer within {timeout:.1f}s")
        return rest

    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=left())
    try:
        conn.request("GET", path, headers={"Accept": "application/json"})
        sock = conn.sock
        assert sock is not None
        sock.settimeout(left())
        resp = conn.getresponse()
        if resp.status != 200:
            # NOTE: redirects are refused, not followed: a pod must not make us fetch another
            # URL (an internal metadata service, say).
            raise OSError(f"{base_url}{path}: HTTP {resp.status}")
        length = resp.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise OSError(f"{base_url}{path}: answer of {length} bytes (limit {max_bytes})")
        chunks: list[bytes] = []
        size = 0
        while not resp.isclosed():
            sock.settimeout(left())
            chunk = resp.read1(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise OSError(f"{base_url}{path}: answer over {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    except http.client.HTTPException as exc:
        raise OSError(f"{base_url}{path}: {exc}") from None
    finally:
        conn.close()


def fetch_event_sources(
    base_url: str,
    timeout: float = 2.0,
    *,
    allowed_hosts: Collection[str] = (),
    max_bytes: int = 1 << 20,
    max_ranks: int = 64,
) -> dict[int, tuple[str, str | None]]:
    """Ask a vLLM server (``http://<address>:<port>``) where its KV-event publishers are.

    Args:
        base_url: The pod's serving URL.
        timeout: Seconds for the whole request (connect, headers and body).
        allowed_hosts: Hosts besides the pod's own that the answer may point at.
        max_bytes: Largest answer read.
        max_ranks: Most DP ranks accepted.

    Returns:
        DP rank -> (publisher, replay endpoint), see `parse_event_sources`.

    Raises:
        OSError: The server could not be reached, answered anything but 200, too slowly or
            too much.
        ValueError: The answer is not vLLM's event-sources map, or names endpoints we do not
            dial.
    """
    body = _read_bounded(base_url.rstrip("/"), "/kv_event_sources", timeout, max_bytes)
    try:
        data = json.loads(body)
    except (UnicodeError, RecursionError) as exc:
        raise ValueError(f"undecodable event sources: {exc!r}") from None
    host = urllib.parse.urlsplit(base_url).hostname or ""
    return parse_event_sources(data, host, allowed_hosts=allowed_hosts, max_ranks=max_ranks)
