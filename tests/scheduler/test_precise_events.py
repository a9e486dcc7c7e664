"""Wiring of the precise scorer to the KV-event subscriber (connect mode) across pool changes.

The subscriber itself (ZMQ sockets, replay) is another component with its own tests; here a
recording stand-in with the same interface checks which endpoints the scorer dials and drops.
"""

from __future__ import annotations

import types
from typing import Any

import pytest

from kvaware_scorer.scheduler import Endpoint, Scheduler, make_plugin_manager

from .conftest import config

SUBSCRIBER_MODULE = "kvaware_scorer.events.subscriber"


class RecordingSubscriber:
    instances: list[RecordingSubscriber] = []

    def __init__(self, indexer: Any, config: Any) -> None:
        self.indexer = indexer
        self.config = config
        self.calls: list[tuple[Any, ...]] = []
        RecordingSubscriber.instances.append(self)

    def start(self) -> None:
        self.calls.append(("start",))

    def stop(self) -> None:
        self.calls.append(("stop",))

    def add_endpoint(
        self,
        pod_id: str,
        endpoint: str,
        replay_endpoint: str | None = None,
        model: str | None = None,
    ) -> None:
        self.calls.append(("add", pod_id, endpoint, replay_endpoint, model))

    def remove_endpoint(self, pod_id: str) -> None:
        self.calls.append(("remove", pod_id))


@pytest.fixture
def subscriber(monkeypatch: pytest.MonkeyPatch) -> type[RecordingSubscriber]:
    RecordingSubscriber.instances = []
    module = types.ModuleType(SUBSCRIBER_MODULE)
    module.KVEventSubscriber = RecordingSubscriber  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, SUBSCRIBER_MODULE, module)
    return RecordingSubscriber


def precise(**events: Any) -> Scheduler:
    params: dict[str, Any] = {"kvEventsConfig": events} if events else {}
    return Scheduler.from_config(
        config([{"type": "precise-prefix-cache-scorer", "parameters": params}]),
        plugin_manager=make_plugin_manager(use_env=False),
    )


def test_start_dials_endpoint_publishers_and_follows_the_pool(
    subscriber: type[RecordingSubscriber],
) -> None:
    """start() dials each endpoint's kvEvents; removal unsubscribes and purges, additions are dialed."""
    s = precise()
    a = Endpoint(
        "a",
        "10.0.0.1",
        8000,
        kv_events="tcp://10.0.0.1:5557",
        kv_events_replay="tcp://10.0.0.1:5558",
        model="m",
    )
    b = Endpoint("b", "10.0.0.2", 8000)  # no publisher: not dialed
    s.set_endpoints([a, b])
    s.start()
    (sub,) = subscriber.instances
    assert sub.indexer is s.plugin("precise-prefix-cache-scorer").indexer
    assert sub.calls == [
        ("start",),
        ("add", "10.0.0.1:8000", "tcp://10.0.0.1:5557", "tcp://10.0.0.1:5558", "m"),
    ]
    c = Endpoint("c", "10.0.0.3", 8000, kv_events="tcp://10.0.0.3:5557")
    s.set_endpoints([b, c])
    assert sub.calls[2:] == [
        ("remove", "10.0.0.1:8000"),
        ("add", "10.0.0.3:8000", "tcp://10.0.0.3:5557", None, None),
    ]
    s.stop()
    assert sub.calls[-1] == ("stop",)


def test_discover_pods_dials_the_socket_port(subscriber: type[RecordingSubscriber]) -> None:
    """With discoverPods every endpoint is dialed at its address and socketPort (replay port too)."""
    s = precise(discoverPods=True, socketPort=5556, replaySocketPort=5560)
    s.set_endpoints([Endpoint("a", "10.0.0.9", 8000)])
    s.start()
    (sub,) = subscriber.instances
    assert ("add", "10.0.0.9:8000", "tcp://10.0.0.9:5556", "tcp://10.0.0.9:5560", None) in sub.calls
    s.stop()


def test_nothing_opened_without_a_source(subscriber: type[RecordingSubscriber]) -> None:
    """start() opens no subscriber when there is nothing to receive; a publisher joining later starts it."""
    s = precise()
    s.set_endpoints([Endpoint("a", "10.0.0.1", 8000)])
    s.start()
    assert subscriber.instances == []
    s.set_endpoints(
        [
            Endpoint("a", "10.0.0.1", 8000),
            Endpoint("p", "10.0.0.5", 8000, kv_events="tcp://10.0.0.5:5557"),
        ]
    )
    (sub,) = subscriber.instances
    assert sub.calls == [("start",), ("add", "10.0.0.5:8000", "tcp://10.0.0.5:5557", None, None)]
    s.stop()


def test_bind_mode_starts_on_start(subscriber: type[RecordingSubscriber]) -> None:
    """A bound zmqEndpoint starts the subscriber with the scorer's kvEventsConfig."""
    s = precise(zmqEndpoint="tcp://127.0.0.1:5999", topicFilter="kv@")
    s.start()
    (sub,) = subscriber.instances
    assert sub.config.zmq_endpoint == "tcp://127.0.0.1:5999"
    assert sub.config.topic_filter == "kv@"
    s.close()
    assert sub.calls[-1] == ("stop",)


def test_endpoints_no_event_can_come_from_are_named_in_a_warning(
    subscriber: type[RecordingSubscriber], caplog: pytest.LogCaptureFixture
) -> None:
    """start() (and a later join) warns about endpoints without any KV-event source, which would
    otherwise score 0 silently; bind mode and publishers silence it."""
    s = precise()
    s.set_endpoints([Endpoint("a", "10.0.0.1", 8000)])
    with caplog.at_level("WARNING"):
        s.start()
        s.set_endpoints(
            [
                Endpoint("a", "10.0.0.1", 8000),
                Endpoint("b", "10.0.0.2", 8000),
                Endpoint("p", "10.0.0.5", 8000, kv_events="tcp://10.0.0.5:5557"),
            ]
        )
    warned = [r.getMessage() for r in caplog.records if "no KV-event source" in r.getMessage()]
    assert len(warned) == 2
    assert "10.0.0.1:8000" in warned[0] and "discoverPods" in warned[0]
    assert "10.0.0.2:8000" in warned[1] and "10.0.0.5" not in warned[1]
    s.stop()
    caplog.clear()
    bound = precise(zmqEndpoint="tcp://127.0.0.1:5999")
    bound.set_endpoints([Endpoint("a", "10.0.0.1", 8000)])
    with caplog.at_level("WARNING"):
        bound.start()
    assert not [r for r in caplog.records if "no KV-event source" in r.getMessage()]
    bound.stop()
