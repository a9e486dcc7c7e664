"""Kubernetes discovery of the endpoint pool, as the Go EPP does it, through the official
``kubernetes`` Python client (in-cluster config or a kubeconfig).

It watches the named ``InferencePool`` (``inference.networking.k8s.io/v1``: ``spec.selector``
match labels and ``spec.targetPorts``) and the Pods of its namespace that match the selector
(list, then watch from the list's ``resourceVersion``; a 410 Gone relists). A Pod counts when it
has an IP, is not being deleted and its ``Ready`` condition is ``True``; each target port becomes
one endpoint named ``<pod>-rank-<i>`` at ``podIP:port``. Pods that go NotReady or away leave the
pool, which purges them from the index. Without an InferencePool, a label selector and target
ports given on the command line stand in for it.

The pool is handed to `Scheduler.set_endpoints` on every change; pod metrics are scraped by a
`MetricsScraper` over the same pool. Watches run in daemon threads; a failed watch is retried
after `retry_delay` seconds (and logged); nothing here stops the EPP.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler import Endpoint, MetricsScraper, Scheduler

__all__ = ["POOL_GROUP", "POOL_PLURAL", "POOL_VERSION", "KubernetesDiscovery", "PoolSpec"]

logger = logging.getLogger(__name__)

POOL_GROUP = "inference.networking.k8s.io"
POOL_VERSION = "v1"
POOL_PLURAL = "inferencepools"
#: Target ports an InferencePool may list (the API's own maximum).
MAX_TARGET_PORTS = 8
#: Pods tracked at most; more matching Pods are left out (and logged), bounding memory.
MAX_PODS = 4096


def parse_selector(text: str) -> dict[str, str]:
    """``k=v,k2=v2`` (equality terms only, as matchLabels) as a mapping.

    Raises:
        ConfigError: A term is not ``key=value``.
    """
    out: dict[str, str] = {}
    for term in text.split(","):
        term = term.strip()
        if not term:
            continue
        key, sep, value = term.partition("=")
        key, value = key.strip(), value.strip().lstrip("=")
        if not sep or not key:
            raise ConfigError(f"selector term {term!r} is not key=value", "endpoint-selector")
        out[key] = value
    return out


def _ports(values: Any, where: str) -> list[int]:
    ports: list[int] = []
    for v in values:
        try:
            port = int(v)
        except (TypeError, ValueError):
            raise ConfigError(f"not a port: {v!r}", where) from None
        if not 1 <= port <= 65535:
            raise ConfigError(f"port out of range: {port}", where)
        ports.append(port)
    if len(ports) > MAX_TARGET_PORTS:
        raise ConfigError(f"at most {MAX_TARGET_PORTS} target ports", where)
    return ports


@dataclass
class PoolSpec:
    """What selects the pool's endpoints.

    Attributes:
        namespace: Namespace of the pool and its Pods.
        name: InferencePool name (empty: `selector` and `target_ports` are given directly).
        selector: Pod match labels (from the InferencePool once read).
        target_ports: Serving ports, one endpoint per port per Pod.
    """

    namespace: str = "default"
    name: str = ""
    selector: dict[str, str] = field(default_factory=dict)
    target_ports: list[int] = field(default_factory=list)

    @classmethod
    def from_flags(
        cls, *, pool_name: str, namespace: str, selector: str, target_ports: str
    ) -> PoolSpec:
        """The spec the Go EPP's flags describe.

        Raises:
            ConfigError: Neither a pool nor a selector with ports, or a malformed value.
        """
        spec = cls(namespace=namespace or "default", name=pool_name)
        if pool_name:
            return spec
        spec.selector = parse_selector(selector)
        spec.target_ports = _ports(
            [p for p in target_ports.split(",") if p.strip()], "endpoint-target-ports"
        )
        if not spec.selector or not spec.target_ports:
            raise ConfigError(
                "without --pool-name, give --endpoint-selector and --endpoint-target-ports"
            )
        return spec

    def apply_pool(self, pool: Mapping[str, Any]) -> None:
        """Take the selector and target ports of an InferencePool object.

        Raises:
            ConfigError: The object has no usable selector or ports.
        """
        spec = pool.get("spec") or {}
        sel = spec.get("selector") or {}
        labels = sel.get("matchLabels", sel) if isinstance(sel, dict) else {}
        if not isinstance(labels, dict) or not labels:
            raise ConfigError("the InferencePool has no selector", f"{self.namespace}/{self.name}")
        ports = [
            p.get("number") if isinstance(p, dict) else p for p in spec.get("targetPorts") or []
        ]
        self.selector = {str(k): str(v) for k, v in labels.items()}
        self.target_ports = _ports(ports, f"{self.namespace}/{self.name}.spec.targetPorts")
        if not self.target_ports:
            raise ConfigError(
                "the InferencePool has no targetPorts", f"{self.namespace}/{self.name}"
            )

    @property
    def label_selector(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.selector.items()))


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """Whether a Pod object can serve: an IP, not deleting, condition ``Ready`` is ``True``."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp") or not status.get("podIP"):
        return False
    for cond in status.get("conditions") or ():
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


def _abort(w: Any) -> None:
    """Stop a watch now: its flag is only read between events, so its long-poll response is
    closed too (the reading thread then leaves its loop)."""
    w.stop()
    resp = getattr(w, "_resp", None)
    if resp is not None:
        try:
            resp.close()
        except Exception:
            logger.debug("closing a watch response failed", exc_info=True)


class KubernetesDiscovery:
    """Keeps a scheduler's pool equal to the Ready Pods of an InferencePool.

    Args:
        scheduler: Receives the pool (`Scheduler.set_endpoints`).
        spec: The pool (an InferencePool name, or a selector and ports).
        api_client: A ``kubernetes.client.ApiClient``.
        scrape: Scrape every endpoint's ``/metrics`` for load.
        scrape_interval: Seconds between scrape rounds (None: the scraper's default).
        retry_delay: Seconds before a failed list or watch is tried again.
        watch_timeout: Server-side timeout of one watch request (it is then renewed).
    """

    def __init__(
        self,
        scheduler: Scheduler,
        spec: PoolSpec,
        api_client: Any,
        *,
        scrape: bool = True,
        scrape_interval: float | None = None,
        retry_delay: float = 1.0,
        watch_timeout: int = 60,
    ) -> None:
        from kubernetes import client

        self.scheduler = scheduler
        self.spec = spec
        self.core: Any = client.CoreV1Api(api_client)
        self.custom: Any = client.CustomObjectsApi(api_client)
        self.retry_delay = retry_delay
        self.watch_timeout = watch_timeout
        self.on_synced: Callable[[], None] | None = None
        self.synced = threading.Event()
        self._pods: dict[str, dict[str, Any]] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._restart = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watches: list[Any] = []
        self._scraper: MetricsScraper | None = None
        if scrape:
            from kvaware_scorer.scheduler.scrape import DEFAULT_SCRAPE_INTERVAL

            self._scraper = MetricsScraper(
                lambda: scheduler.endpoints,
                interval=scrape_interval or DEFAULT_SCRAPE_INTERVAL,
                clock=scheduler.clock,
                metrics=scheduler.sched_metrics,
                staleness=scheduler.metrics_staleness,
                activity=scheduler.activity,
                on_round=scheduler.metrics_updated,
            )

    @classmethod
    def from_kubeconfig(
        cls, scheduler: Scheduler, spec: PoolSpec, *, kubeconfig: str | None = None, **kw: Any
    ) -> KubernetesDiscovery:
        """Discovery with the in-cluster config (or `kubeconfig`, or ``~/.kube/config``).

        Raises:
            ConfigError: No usable Kubernetes configuration.
        """
        from kubernetes import client
        from kubernetes import config as _config

        config: Any = _config
        try:
            if kubeconfig is None:
                try:
                    config.load_incluster_config()
                except config.ConfigException:
                    config.load_kube_config()
            else:
                config.load_kube_config(config_file=kubeconfig)
        except (config.ConfigException, OSError) as exc:
            raise ConfigError(f"no Kubernetes configuration: {exc}", "kubeconfig") from None
        return cls(scheduler, spec, client.ApiClient(), **kw)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the watches (and the metrics scraper) in daemon threads."""
        self._stop.clear()
        if self.spec.name:
            self._spawn(self._watch_pool, "kvaware-k8s-pool")
        else:
            self._spawn(self._watch_pods, "kvaware-k8s-pods")
        if self._scraper is not None:
            self._scraper.start()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the watches and the scraper (bounded); idempotent."""
        self._stop.set()
        self._restart.set()
        for w in list(self._watches):
            _abort(w)
        if self._scraper is not None:
            self._scraper.stop()
        for t in self._threads:
            t.join(timeout)
        self._threads = []

    # -- the InferencePool ---------------------------------------------------------------------

    def _watch_pool(self) -> None:
        from kubernetes import watch as _watch

        watch: Any = _watch
        spec = self.spec
        started = False
        while not self._stop.is_set():
            try:
                pool: Any = self.custom.get_namespaced_custom_object(
                    POOL_GROUP, POOL_VERSION, spec.namespace, POOL_PLURAL, spec.name
                )
                self._pool_changed(pool)
                if not started:
                    started = True
                    self._spawn(self._watch_pods, "kvaware-k8s-pods")
                version = (pool.get("metadata") or {}).get("resourceVersion")
                w = watch.Watch()
                self._watches.append(w)
                try:
                    for event in w.stream(
                        self.custom.list_namespaced_custom_object,
                        POOL_GROUP,
                        POOL_VERSION,
                        spec.namespace,
                        POOL_PLURAL,
                        field_selector=f"metadata.name={spec.name}",
                        resource_version=version,
                        timeout_seconds=self.watch_timeout,
                    ):
                        if self._stop.is_set():
                            break
                        if event["type"] in ("ADDED", "MODIFIED"):
                            self._pool_changed(event["raw_object"])
                        elif event["type"] == "DELETED":
                            logger.warning("InferencePool %s/%s deleted", spec.namespace, spec.name)
                finally:
                    self._watches.remove(w)
            except Exception as exc:
                if self._stop.is_set():
                    return
                logger.warning("InferencePool %s/%s: %s; retrying", spec.namespace, spec.name, exc)
                self._stop.wait(self.retry_delay)

    def _pool_changed(self, pool: Mapping[str, Any]) -> None:
        old = (dict(self.spec.selector), list(self.spec.target_ports))
        try:
            self.spec.apply_pool(pool)
        except ConfigError as exc:
            logger.error("InferencePool not usable: %s", exc)
            return
        if (self.spec.selector, self.spec.target_ports) != old and old[0]:
            logger.info(
                "InferencePool %s changed: selector %s, ports %s",
                self.spec.name,
                self.spec.label_selector,
                self.spec.target_ports,
            )
            self._restart.set()
            for w in list(self._watches):
                if getattr(w, "_kvaware_pods", False):
                    _abort(w)

    # -- the Pods ------------------------------------------------------------------------------

    def _watch_pods(self) -> None:
        from kubernetes import watch as _watch
        from kubernetes.client.exceptions import ApiException

        watch: Any = _watch
        spec = self.spec
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None or self._restart.is_set():
                    self._restart.clear()
                    version = self._list_pods()
                w = watch.Watch()
                w._kvaware_pods = True
                self._watches.append(w)
                try:
                    for event in w.stream(
                        self.core.list_namespaced_pod,
                        spec.namespace,
                        label_selector=spec.label_selector,
                        resource_version=version,
                        timeout_seconds=self.watch_timeout,
                        allow_watch_bookmarks=True,
                    ):
                        if self._stop.is_set() or self._restart.is_set():
                            break
                        obj = event["raw_object"]
                        kind = event["type"]
                        rv = (obj.get("metadata") or {}).get("resourceVersion")
                        if rv:
                            version = rv
                        if kind == "BOOKMARK":
                            continue
                        if kind == "ERROR":
                            version = None  # e.g. 410 Gone inside the stream: relist
                            break
                        self._pod_event(kind, obj)
                finally:
                    self._watches.remove(w)
            except ApiException as exc:
                if exc.status == 410:
                    version = None
                    continue
                if self._stop.is_set():
                    return
                logger.warning("pods of %s: %s; retrying", spec.label_selector, exc)
                version = None
                self._stop.wait(self.retry_delay)
            except Exception as exc:
                if self._stop.is_set():
                    return
                logger.warning("pods of %s: %s; retrying", spec.label_selector, exc)
                version = None
                self._stop.wait(self.retry_delay)

    def _list_pods(self) -> str | None:
        resp = self.core.list_namespaced_pod(
            self.spec.namespace, label_selector=self.spec.label_selector, _preload_content=False
        )
        data = json.loads(resp.data)
        pods: dict[str, dict[str, Any]] = {}
        for pod in data.get("items") or ():
            name = (pod.get("metadata") or {}).get("name")
            if name and len(pods) < MAX_PODS:
                pods[name] = pod
        if len(data.get("items") or ()) > MAX_PODS:
            logger.error("more than %d pods match; the rest are left out", MAX_PODS)
        with self._lock:
            self._pods = pods
        self._publish()
        if not self.synced.is_set():
            self.synced.set()
            if self.on_synced is not None:
                self.on_synced()
        version: str | None = (data.get("metadata") or {}).get("resourceVersion")
        return version

    def _pod_event(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        name = meta.get("name")
        if not name:
            return
        labels = meta.get("labels") or {}
        matches = all(labels.get(k) == v for k, v in self.spec.selector.items())
        with self._lock:
            if kind == "DELETED" or not matches:
                if self._pods.pop(name, None) is None:
                    return
            elif name in self._pods or len(self._pods) < MAX_PODS:
                self._pods[name] = pod
            else:
                logger.error("more than %d pods match; %s is left out", MAX_PODS, name)
                return
        self._publish()

    def _publish(self) -> None:
        """Hand the Ready Pods' endpoints to the scheduler (same objects for pods that stay)."""
        with self._lock:
            pods = list(self._pods.values())
            ports = list(self.spec.target_ports)
            fresh: dict[str, Endpoint] = {}
            for pod in pods:
                if not pod_ready(pod):
                    continue
                meta = pod["metadata"]
                ip = pod["status"]["podIP"]
                for rank, port in enumerate(ports):
                    eid = f"{ip}:{port}"
                    ep = self._endpoints.get(eid)
                    name = f"{meta['name']}-rank-{rank}"
                    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
                    node = pod["status"].get("hostIP") or None
                    if ep is None:
                        ep = Endpoint(
                            name=name,
                            address=ip,
                            port=port,
                            labels=labels,
                            namespace=meta.get("namespace") or self.spec.namespace,
                            pod=meta["name"],
                            node_address=node,
                        )
                    else:
                        ep.name, ep.labels = name, labels
                        ep.pod, ep.node_address = meta["name"], node
                    fresh[eid] = ep
            self._endpoints = fresh
            endpoints = list(fresh.values())
        self.scheduler.set_endpoints(endpoints)
