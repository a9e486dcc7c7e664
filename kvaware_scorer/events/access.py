"""Who may publish KV events to us: bind-mode pod admission and ZMQ CURVE authentication.

Bind mode takes the pod id from the topic, which any publisher that reaches the socket can
write. `PodAdmission` applies frames only of pods the scheduler knows (open mode: any pod, at
most ``maxPods`` at once, silent ones reclaimed). `CurveKeys` sets pyzmq's CURVE options on our
sockets so that only publishers with the right keys get a connection at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import zmq

from kvaware_scorer.config import KVEventsConfig, KVEventsCurve
from kvaware_scorer.errors import ConfigError

__all__ = ["CurveKeys", "PodAdmission"]

logger = logging.getLogger(__name__)

#: Seconds between two reclaim passes forced by a full pod table.
_RECLAIM_EVERY: Final = 1.0


class PodAdmission:
    """Which bind-mode pods' frames are applied. Used by the receiving thread only.

    Args:
        config: ``acceptUnknownPods``, ``maxPods``, ``podIdleSeconds`` and static ``endpoints``.
        dropped: The ``kvaware_dropped_messages`` counter family (``unknown_pod``,
            ``too_many_pods``).
        forget: Called with each pod reclaimed in open mode (to purge it).
    """

    def __init__(self, config: KVEventsConfig, dropped: Any, forget: Callable[[str], None]) -> None:
        self._config = config
        self._dropped = dropped
        self._forget = forget
        self._known: frozenset[str] = frozenset(config.endpoints)
        # open mode: pod id -> monotonic time of its last frame (at most ``maxPods``)
        self._seen: dict[str, float] = {}
        self._next_reclaim = 0.0

    def set_known(self, pods: Iterable[str]) -> None:
        """The scheduler's pod ids (static ``endpoints`` are always known)."""
        self._known = frozenset(pods) | frozenset(self._config.endpoints)

    def accepts(self, pod: str) -> bool:
        """Whether a frame naming `pod` in its topic is applied (counted when not)."""
        if pod in self._known:
            return True
        cfg = self._config
        if not cfg.accept_unknown_pods:
            self._dropped.labels("unknown_pod").inc()
            return False
        seen = self._seen
        now = time.monotonic()
        if pod not in seen and len(seen) >= cfg.max_pods:
            if now >= self._next_reclaim:
                self._next_reclaim = now + _RECLAIM_EVERY
                self.reclaim()
            if len(seen) >= cfg.max_pods:
                self._dropped.labels("too_many_pods").inc()
                return False
        seen[pod] = now
        return True

    def reclaim(self) -> None:
        """Open mode: forget pods silent for ``podIdleSeconds`` (each handed to `forget`), so
        spoofed or departed pod ids do not pile up."""
        if not self._seen:
            return
        limit = time.monotonic() - self._config.pod_idle_seconds
        gone = [p for p, t in self._seen.items() if t < limit]
        for pod in gone:
            del self._seen[pod]
            self._forget(pod)
        if gone:
            logger.info("forgot %d idle pods (open bind mode)", len(gone))


class CurveKeys:
    """CURVE options for our sockets, from ``kvEventsConfig.curve`` (nothing when None).

    In bind mode our socket is the CURVE server; a ZAP handler (pyzmq's `ThreadAuthenticator`)
    admits the publishers whose public certificates are in ``clientKeysDir`` (any, when unset).
    In connect mode our sockets are CURVE clients of the pods' publishers (``serverKey``).
    """

    def __init__(self, curve: KVEventsCurve | None) -> None:
        self._curve = curve
        self._auth: Any = None

    def _keys(self) -> tuple[bytes, bytes]:
        """Our (public, secret) keys.

        Raises:
            ConfigError: The certificate cannot be read or holds no secret key.
        """
        curve = self._curve
        assert curve is not None
        try:
            import zmq.auth

            public, secret = zmq.auth.load_certificate(curve.certificate)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot read the CURVE certificate: {exc}", "kvEventsConfig.curve.certificate"
            ) from None
        if secret is None:
            raise ConfigError(
                "the CURVE certificate holds no secret key", "kvEventsConfig.curve.certificate"
            )
        return public, secret

    def server(self, sock: zmq.Socket[Any], ctx: zmq.Context[Any] | None) -> None:
        """Make `sock` (our bound socket) authenticate the publishers that connect.

        Raises:
            ConfigError: The certificate cannot be read.
        """
        curve = self._curve
        if curve is None:
            return
        _public, secret = self._keys()
        if self._auth is None:
            import zmq.auth
            from zmq.auth.thread import ThreadAuthenticator

            assert ctx is not None
            auth = ThreadAuthenticator(ctx)
            auth.start()
            location = curve.client_keys_dir or zmq.auth.CURVE_ALLOW_ANY
            auth.configure_curve(domain="*", location=location)
            self._auth = auth
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)

    def client(self, sock: zmq.Socket[Any]) -> None:
        """Make `sock` (a SUB or replay DEALER we dial with) authenticate the pod's publisher.

        Raises:
            ConfigError: No ``serverKey``, or the certificate cannot be read.
        """
        curve = self._curve
        if curve is None:
            return
        if curve.server_key is None:
            raise ConfigError(
                "connect mode with CURVE needs the publishers' public key",
                "kvEventsConfig.curve.serverKey",
            )
        public, secret = self._keys()
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_key.encode("ascii"))

    def stop(self) -> None:
        """Stop the ZAP handler, if one runs."""
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
