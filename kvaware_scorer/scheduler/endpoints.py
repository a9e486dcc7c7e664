"""The endpoints file (``endpoints: [{name, address, port, labels, ...}]``) and its watcher.

The file names every serving endpoint the scheduler may route to::

    endpoints:
      - name: vllm-0
        address: 10.0.0.1
        port: 8000
        labels: {llm-d.ai/role: decode}
        model: Qwen/Qwen3-32B           # optional
        kvEvents: tcp://10.0.0.1:5557   # optional: the pod's KV-event publisher (connect mode)
        kvEventsReplay: tcp://10.0.0.1:5558  # optional: its replay endpoint
        metricsPath: /metrics           # optional
        metricsPort: 8000               # optional (default: port)
        pod: vllm-0-7d9f                # optional: the Kubernetes pod (per-pod GPU metrics)
        nodeAddress: 10.0.1.5           # optional: its node (node-level exporters)

`EndpointsWatcher` polls the file's modification time and reloads it when it changes; a bad
file (invalid YAML or values, not UTF-8, nested too deeply) is reported with its YAML path and
line, counted in ``kvaware_endpoint_reloads_total{result="error"}``, and the previous pool is
kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from kvaware_scorer.config import ConfigModel, EngineType, load_model
from kvaware_scorer.configio import YamlDocument, load_yaml
from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler.types import Endpoint

if TYPE_CHECKING:
    from kvaware_scorer.scheduler.metrics import SchedulerMetrics

__all__ = ["EndpointSpec", "EndpointsFile", "EndpointsWatcher", "load_endpoints", "parse_endpoints"]

logger = logging.getLogger(__name__)


class EndpointSpec(ConfigModel):
    """One entry of the endpoints file.

    Attributes:
        name: Display name (default: ``address:port``).
        address: IP address or host name.
        port: Serving port (an int or a numeric string, as upstream's file discovery).
        namespace: Kubernetes namespace (informational).
        labels: Pod labels (filters read them); scalar values are turned into strings.
        model: Served model.
        kv_events: The pod's ZMQ publisher endpoint (``tcp://host:port``), connect mode.
        kv_events_replay: The pod's replay ROUTER endpoint.
        metrics_path: HTTP path of the Prometheus metrics.
        metrics_port: Port of the metrics endpoint (default: `port`).
        engine: The serving engine, ``vllm`` or ``sglang`` (default: the pod label
            ``llm-d.ai/engine-type``, else the scorer's ``engineType``).
        pod: The Kubernetes pod serving the endpoint (``dcgm-extractor`` matches the GPU
            samples of a node exporter by it; default: none, every sample counts).
        node_address: The address of the pod's node (``dcgm-data-source`` with
            ``useNodeAddress``).
    """

    name: str | None = None
    address: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    model: str | None = None
    kv_events: str | None = None
    kv_events_replay: str | None = None
    metrics_path: str = "/metrics"
    metrics_port: int | None = Field(None, ge=1, le=65535)
    engine: EngineType | None = None
    pod: str | None = None
    node_address: str | None = None

    @field_validator("port", mode="before")
    @classmethod
    def _port(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: (str(v).lower() if isinstance(v, bool) else str(v))
                if isinstance(v, int | float | bool)
                else v
                for k, v in value.items()
            }
        return value

    @field_validator("metrics_path")
    @classmethod
    def _path(cls, value: str) -> str:
        return value if value.startswith("/") else "/" + value

    def to_endpoint(self) -> Endpoint:
        """The `Endpoint` this entry describes."""
        return Endpoint(
            name=self.name or f"{self.address}:{self.port}",
            address=self.address,
            port=self.port,
            labels=dict(self.labels),
            kv_events=self.kv_events,
            kv_events_replay=self.kv_events_replay,
            model=self.model,
            namespace=self.namespace,
            metrics_path=self.metrics_path,
            metrics_port=self.metrics_port,
            engine=self.engine,
            pod=self.pod,
            node_address=self.node_address,
        )


class EndpointsFile(ConfigModel):
    """The endpoints file: ``endpoints: [...]``."""

    endpoints: list[EndpointSpec] = Field(default_factory=list)


def parse_endpoints(data: Any) -> list[Endpoint]:
    """Endpoints from the parsed YAML of an endpoints file.

    Raises:
        ConfigError: Invalid shape or values (the path names the entry, e.g.
            ``endpoints[2].port``), or two entries with the same ``address:port``.
    """
    if data is None:
        data = {}
    parsed = load_model(EndpointsFile, data)
    out: list[Endpoint] = []
    seen: dict[str, int] = {}
    for i, spec in enumerate(parsed.endpoints):
        ep = spec.to_endpoint()
        if ep.id in seen:
            raise ConfigError(
                f"duplicate endpoint {ep.id} (also endpoints[{seen[ep.id]}])", f"endpoints[{i}]"
            )
        seen[ep.id] = i
        out.append(ep)
    return out


def load_endpoints(path: str | Path) -> list[Endpoint]:
    """Endpoints from an endpoints YAML file (see the module docstring).

    Raises:
        ConfigError: Unreadable or invalid file (with the file and line of each problem).
    """
    return _parse_document(load_yaml(Path(path)))


def _parse_document(doc: YamlDocument) -> list[Endpoint]:
    try:
        return parse_endpoints(doc.data)
    except ConfigError as exc:
        raise doc.locate(exc) from None


def _update(old: Endpoint, new: Endpoint) -> None:
    """Copy `new`'s description onto `old`, keeping `old`'s metrics (same pod id)."""
    old.name = new.name
    old.labels = new.labels
    old.kv_events = new.kv_events
    old.kv_events_replay = new.kv_events_replay
    old.model = new.model
    old.namespace = new.namespace
    old.metrics_path = new.metrics_path
    old.metrics_port = new.metrics_port
    old.pod = new.pod
    old.node_address = new.node_address


class EndpointsWatcher:
    """Reloads an endpoints file when it changes and hands the pool to `on_change`.

    Endpoint objects of pods that stay in the file are kept (with their metrics) and updated in
    place; `on_change` receives the whole new pool (e.g. `Scheduler.set_endpoints`, which purges
    removed pods from every index). A file that fails to load is logged and counted; the
    previous pool stays in force.

    Args:
        path: The endpoints file.
        on_change: Called with the new pool after each successful (re)load that changed it.
        poll_interval: Seconds between modification-time checks.
        metrics: Counts reloads by result.
    """

    def __init__(
        self,
        path: Path,
        on_change: Callable[[Sequence[Endpoint]], None],
        *,
        poll_interval: float = 1.0,
        metrics: SchedulerMetrics | None = None,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError("poll_interval must be > 0")
        self.path = path
        self.on_change = on_change
        self.poll_interval = poll_interval
        self.metrics = metrics
        self._current: dict[str, Endpoint] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._digest: bytes | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def endpoints(self) -> list[Endpoint]:
        """The pool from the last successful load."""
        return list(self._current.values())

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self) -> list[Endpoint]:
        """Load the file now and hand the pool to `on_change` if it changed.

        Raises:
            ConfigError: The file is missing or invalid (nothing changes).
        """
        with self._lock:
            stamp = self._file_stamp()
            try:
                raw = self.path.read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read endpoints file: {exc.strerror or exc}", str(self.path)
                ) from None
            digest = hashlib.blake2b(raw, digest_size=16).digest()
            self._stamp = stamp
            if digest == self._digest:
                return self.endpoints
            fresh = _parse_document(load_yaml(raw, str(self.path)))
            pool: dict[str, Endpoint] = {}
            for ep in fresh:
                old = self._current.get(ep.id)
                if old is not None:
                    _update(old, ep)
                    ep = old
                pool[ep.id] = ep
            self._current = pool
            self._digest = digest
            endpoints = list(pool.values())
        logger.info("loaded %d endpoint(s) from %s", len(endpoints), self.path)
        self.on_change(endpoints)
        if self.metrics is not None:
            self.metrics.endpoint_reloads.labels("ok").inc()
        return endpoints

    def check(self) -> bool:
        """Reload if the file's modification stamp changed; returns whether it reloaded.

        Errors are logged and counted (``result="error"``), never raised (the previous pool
        stays); that includes an unexpected failure, logged with its traceback.
        """
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        try:
            self.load()
        except Exception as exc:
            self._stamp = stamp  # NOTE: do not retry the same broken file on every poll
            if self.metrics is not None:
                self.metrics.endpoint_reloads.labels("error").inc()
            if isinstance(exc, ConfigError):
                logger.error(
                    "endpoints file %s not reloaded, keeping %d endpoint(s): %s",
                    self.path,
                    len(self._current),
                    exc,
                )
            else:
                logger.exception(
                    "endpoints file %s not reloaded, keeping %d endpoint(s)",
                    self.path,
                    len(self._current),
                )
            return False
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.check()
            except Exception:
                logger.exception("endpoints watcher check failed")

    def start(self) -> None:
        """Start polling in a daemon thread; idempotent."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="kvaware-endpoints", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop polling, waiting at most `timeout` seconds."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
