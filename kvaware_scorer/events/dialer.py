"""`PodDialer`: connect mode's sockets: a SUB socket per pod dialing its publishers, a monitor
on each, and the redial of a connection ZMQ gave up on.

Owned by the subscriber's receiving thread (nothing here is thread-safe): the subscriber polls
the sockets registered here and reads their frames itself; this module only opens, watches and
closes them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

import zmq
from zmq.utils.monitor import recv_monitor_message

from kvaware_scorer.errors import ConfigError

if TYPE_CHECKING:
    from kvaware_scorer.events.access import CurveKeys

__all__ = ["PodDialer", "Sources"]

logger = logging.getLogger(__name__)

#: Seconds after a disconnect without ZMQ's own retry before the pod is dialed again.
_REDIAL_DELAY: Final = 0.5

#: Socket -> (pod id in connect mode, None for the bind-mode socket; the pod's model).
Sources = dict[zmq.Socket[Any], tuple[str | None, str | None]]


class PodDialer:
    """Dials pods' publishers, one SUB socket per pod, registered in `poller` and `sources`.

    Args:
        poller: The receiving loop's poller (sockets and monitors are registered there).
        sources: The receiving loop's socket table (shared with the bind-mode socket).
        new_sub: Makes a SUB socket with the subscriber's options.
        curve: CURVE keys (a dialing socket is made a CURVE client when they are set).
        dropped: The dropped-messages metric family (``bad_endpoint``, ``protocol_error``).

    Attributes:
        monitors: Monitor socket -> the pod whose SUB socket it watches.
    """

    def __init__(
        self,
        poller: zmq.Poller,
        sources: Sources,
        new_sub: Callable[[], zmq.Socket[Any]],
        curve: CurveKeys,
        dropped: Any,
    ) -> None:
        self._poller = poller
        self._sources = sources
        self._new_sub = new_sub
        self._curve = curve
        self._dropped = dropped
        self.monitors: dict[zmq.Socket[Any], str] = {}
        self._by_pod: dict[str, zmq.Socket[Any]] = {}
        # pod -> (when to redial it, its endpoints ZMQ is not retrying)
        self._redial: dict[str, tuple[float, set[bytes]]] = {}

    def connect(self, pod_id: str, endpoints: Iterable[str], model: str | None) -> None:
        """Dial `endpoints` for `pod_id` (closing its previous socket, if any)."""
        self.disconnect(pod_id)
        sub = self._new_sub()
        dialed = sorted(set(endpoints))
        try:
            self._curve.client(sub)
            for endpoint in dialed:
                sub.connect(endpoint)
        except (zmq.ZMQError, ConfigError) as exc:
            sub.close(0)
            logger.error("cannot dial %s for pod %s: %s", dialed, pod_id, exc)
            self._dropped.labels("bad_endpoint").inc()
            return
        poller = self._poller
        poller.register(sub, zmq.POLLIN)
        self._sources[sub] = (pod_id, model)
        self._by_pod[pod_id] = sub
        mon = sub.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CONNECTED
        )
        self.monitors[mon] = pod_id
        poller.register(mon, zmq.POLLIN)
        logger.info("dialing KV events of %s at %s", pod_id, ", ".join(dialed))

    def disconnect(self, pod_id: str) -> None:
        """Close `pod_id`'s socket and its monitor, if it has one."""
        old = self._by_pod.pop(pod_id, None)
        if old is None:
            return
        poller = self._poller
        poller.unregister(old)
        self._sources.pop(old, None)
        for mon, owner in list(self.monitors.items()):
            if owner == pod_id:
                poller.unregister(mon)
                del self.monitors[mon]
                mon.close(0)
        old.disable_monitor()
        old.close(0)

    def on_monitor(self, mon: zmq.Socket[Any]) -> None:
        """Watch a dialed pod's connections. NOTE: ZMQ redials a dropped connection by itself
        (a disconnect is followed by a retry at once), except after a protocol error: a frame
        above ``maxFrameBytes`` is one. Such a connection is redialed (see `due`); what was
        lost meanwhile shows as a seq gap."""
        pod = self.monitors.get(mon)
        while mon.poll(0):
            event = recv_monitor_message(mon)
            if pod is None:
                continue
            endpoint = event["endpoint"]
            kind = event["event"]
            due = self._redial.get(pod)
            if kind == zmq.EVENT_DISCONNECTED:
                if due is None:
                    due = self._redial[pod] = (time.monotonic() + _REDIAL_DELAY, set())
                due[1].add(endpoint)
            elif due is not None:  # ZMQ is retrying this endpoint itself
                due[1].discard(endpoint)
                if not due[1]:
                    del self._redial[pod]

    def due(self) -> list[str]:
        """The pods whose connections ZMQ dropped for good and that are due for a redial
        (each returned once)."""
        if not self._redial:
            return []
        now = time.monotonic()
        pods = [pod for pod, (at, _endpoints) in self._redial.items() if at <= now]
        for pod in pods:
            del self._redial[pod]
        return pods

    def next_due(self) -> float | None:
        """When the next redial is due (`time.monotonic`), or None when none is pending."""
        if not self._redial:
            return None
        return min(at for at, _endpoints in self._redial.values())

    def close_all(self) -> None:
        """Close every monitor and every socket of `sources` (the bind-mode one too)."""
        for mon in self.monitors:
            mon.close(0)
        self.monitors.clear()
        for sock in self._sources:
            sock.close(0)
        self._sources.clear()
