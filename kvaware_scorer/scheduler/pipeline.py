"""The `Scheduler`: the host that builds plugin objects from a resolved config and runs them.

It owns what lives beyond one request: the plugin objects (built with their `PluginContext`),
the endpoint pool (set directly or from an endpoints file, with the metrics scraper), flow
control (`kvaware_scorer.scheduler.flowcontrol`: a request may wait for its turn before
scheduling), worker threads for blocking preparation, the plugins' lifecycle and the
``kvaware_`` lifecycle hooks. One scheduling call through the profiles (admission, filter ->
score -> pick, pre-request hooks) is `kvaware_scorer.scheduler.profiles.ProfileRunner`. After
the response, `post_response` runs the post-response hooks.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy
from prometheus_client import CollectorRegistry

from kvaware_scorer.errors import (
    ConfigError,
    KVAwareError,
    NoEndpointError,
    TokenizerNotFoundError,
)
from kvaware_scorer.metrics import Metrics
from kvaware_scorer.scheduler.config import PluginConfig, SchedulerConfig, load_config
from kvaware_scorer.scheduler.flowcontrol import FlowController, build_flow_controller
from kvaware_scorer.scheduler.manager import Hooks, make_plugin_manager
from kvaware_scorer.scheduler.metrics import SchedulerMetrics
from kvaware_scorer.scheduler.profiles import ProfileRunner, build_profiles
from kvaware_scorer.scheduler.registry import KINDS, PluginContext, PluginRegistry
from kvaware_scorer.scheduler.scrape import Activity
from kvaware_scorer.scheduler.types import (
    Endpoint,
    EndpointsListener,
    FirstTokenListener,
    KVEventSink,
    Lifecycle,
    PostResponse,
    ProfileView,
    RequestPreparer,
    ResponseInfo,
    SchedulingContext,
    SchedulingRequest,
    SchedulingResult,
)

if TYPE_CHECKING:
    from kvaware_scorer.scheduler.endpoints import EndpointsWatcher
    from kvaware_scorer.scheduler.scrape import MetricsScraper

__all__ = ["DEFAULT_METRICS_STALENESS", "Scheduler"]

logger = logging.getLogger(__name__)

#: Seconds after which scraped metrics count as unknown (upstream's staleness threshold).
DEFAULT_METRICS_STALENESS = 2.0


def _plugin_rng(seed: int | str | None, name: str) -> random.Random:
    # NOTE: one generator per plugin, derived from (seed, name): adding a plugin does not shift
    # the random stream of the others, so emulator runs stay comparable across configs.
    return random.Random(f"{seed}/{name}") if seed is not None else random.Random()


class Scheduler:
    """Runs EndpointPickerConfig profiles: filters -> scorers -> picker -> request hooks.

    Build one with `from_yaml` or `from_config`.

    Args:
        config: A resolved configuration.
        registry: The registry it was resolved against.
        hooks: The hook facade (its plugins get the lifecycle hooks).
        clock: Monotonic clock in seconds (TTLs, timeouts, metric staleness).
        seed: Seed of every plugin's random generator (None: nondeterministic).
        metrics_staleness: Seconds after which endpoint metrics are unknown (None: never).
        metrics: Share a `Metrics` (and its registry) instead of making one.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        *,
        registry: PluginRegistry,
        hooks: Hooks,
        clock: Callable[[], float] = time.monotonic,
        seed: int | str | None = None,
        metrics_staleness: float | None = DEFAULT_METRICS_STALENESS,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.hooks = hooks
        self.clock = clock
        self.seed = seed
        self.metrics_staleness = metrics_staleness
        self.metrics = metrics if metrics is not None else Metrics()
        self.sched_metrics = SchedulerMetrics(self.metrics.registry)
        self._lock = threading.RLock()
        self._running = False
        #: Marked on every decision and every look at the pool's load (flow control): the
        #: metrics scraper goes round when they were read (`MetricsScraper`).
        self.activity = Activity()
        self._endpoints: list[Endpoint] = []
        self._tracked: frozenset[str] = frozenset()
        self._watcher: EndpointsWatcher | None = None
        self._scraper: MetricsScraper | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._plugins: dict[str, object] = {}
        for name, pc in config.plugins.items():
            # NOTE: filled in order: a factory may look up the plugins built before it.
            self._plugins[name] = self._build_plugin(name, pc)
        profiles, self._views = build_profiles(config, self._plugins)
        self._runner = ProfileRunner(
            profiles,
            self._views,
            self._plugins[config.profile_handler],  # type: ignore[arg-type]
            self._with_kind("admitter"),
            self._with_kind("pre-request"),  # type: ignore[arg-type]
            self.sched_metrics,
        )
        self._post_response: list[tuple[str, PostResponse]] = self._with_kind("post-response")  # type: ignore[assignment]
        self.flow: FlowController | None = build_flow_controller(
            config, self._plugins, lambda: self._endpoints, self.context, self._make_default
        )
        self._lifecycle: list[Lifecycle] = self._capable(Lifecycle)
        self._listeners: list[EndpointsListener] = self._capable(EndpointsListener)
        self._sinks: list[KVEventSink] = self._capable(KVEventSink)
        self._preparers: list[RequestPreparer] = self._capable(RequestPreparer)
        self._first_token: list[FirstTokenListener] = self._capable(FirstTokenListener)
        self._blocking = any(getattr(obj, "blocking_io", False) for obj in self._plugins.values())
        hooks.scheduler_created(self)

    def _build_plugin(self, name: str, pc: PluginConfig) -> object:
        """The plugin object of configured plugin `name`, checked to play its declared roles."""
        ctx = PluginContext(
            name=name,
            type=pc.type,
            clock=self.clock,
            rng=_plugin_rng(self.seed, name),
            metrics=self.metrics,
            scheduler=self,
        )
        try:
            obj = pc.spec.factory(pc.params, ctx)
        except ConfigError as exc:
            where = f"{pc.path}.parameters" + (f".{exc.path}" if exc.path else "")
            raise ConfigError(exc.message, where) from exc
        for kind in pc.kinds:
            if not callable(getattr(obj, KINDS[kind], None)):
                raise ConfigError(
                    f"plugin type {pc.type!r} declares role {kind!r} but its object has no "
                    f"{KINDS[kind]}() method",
                    pc.path,
                )
        return obj

    def _make_default(self, type_name: str, params: Mapping[str, Any]) -> object:
        """A plugin of `type_name` the configuration did not list (a default of a section)."""
        spec, _ = self.registry.resolve(type_name)
        ctx = PluginContext(
            name=type_name,
            type=spec.type,
            clock=self.clock,
            rng=_plugin_rng(self.seed, type_name),
            metrics=self.metrics,
            scheduler=self,
        )
        return spec.factory(spec.params.model_validate(dict(params)), ctx)

    def _with_kind(self, kind: str) -> list[tuple[str, object]]:
        return [
            (name, self._plugins[name])
            for name, pc in self.config.plugins.items()
            if kind in pc.kinds
        ]

    def _capable(self, proto: type) -> list[Any]:
        return [obj for obj in self._plugins.values() if isinstance(obj, proto)]

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        data: Mapping[str, Any] | str | Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        seed: int | str | None = None,
        plugin_manager: pluggy.PluginManager | None = None,
        block_plugins: Sequence[str] = (),
        metrics_staleness: float | None = DEFAULT_METRICS_STALENESS,
        metrics: Metrics | None = None,
    ) -> Scheduler:
        """A scheduler from a parsed EndpointPickerConfig mapping, YAML text or a file path.

        Args:
            data: The mapping, YAML text, or a `Path`.
            clock: Monotonic clock (the emulator passes its virtual clock).
            seed: Seed for every random choice (pickers, tie-breaks).
            plugin_manager: Use this manager (default: `make_plugin_manager`).
            block_plugins: Plugin names not to load (with the default manager).
            metrics_staleness: Seconds after which endpoint metrics are unknown.
            metrics: Share a `Metrics`.

        Raises:
            ConfigError: Invalid configuration (the path names the YAML location).
        """
        pm = plugin_manager or make_plugin_manager(block=block_plugins)
        hooks = Hooks(pm)
        registry = PluginRegistry()
        hooks.register_plugins(registry)
        config = load_config(data, registry)
        hooks.config_resolved(config)
        return cls(
            config,
            registry=registry,
            hooks=hooks,
            clock=clock,
            seed=seed,
            metrics_staleness=metrics_staleness,
            metrics=metrics,
        )

    @classmethod
    def from_yaml(cls, path: str | Path, **kw: Any) -> Scheduler:
        """A scheduler from an EndpointPickerConfig YAML file (keywords as `from_config`)."""
        return cls.from_config(Path(path), **kw)

    # -- introspection ------------------------------------------------------------------------

    @property
    def plugins(self) -> Mapping[str, object]:
        """Plugin objects by configured name."""
        return self._plugins

    def plugin(self, name: str) -> Any:
        """The plugin object configured under `name`.

        Raises:
            KeyError: No such plugin.
        """
        return self._plugins[name]

    @property
    def profiles(self) -> Mapping[str, ProfileView]:
        """The configured profiles."""
        return self._views

    @property
    def event_sinks(self) -> list[KVEventSink]:
        """Plugins that accept vLLM KV-event payloads (``ingest(pod, model, payload, seq)``)."""
        return list(self._sinks)

    @property
    def metrics_registry(self) -> CollectorRegistry:
        """Scheduler and indexer metrics (one registry, for a ``/metrics`` route)."""
        return self.metrics.registry

    @property
    def metrics_interval(self) -> float | None:
        """Seconds between pod-metrics scrapes that the configured plugins need: the smallest
        ``metrics_interval`` any plugin object declares, or None when no plugin reads scraped
        metrics (nothing is scraped then)."""
        wanted = [
            float(v)
            for obj in self._plugins.values()
            if (v := getattr(obj, "metrics_interval", None)) is not None and v > 0
        ]
        return min(wanted) if wanted else None

    @property
    def scrape_interval(self) -> float | None:
        """Seconds between the scrapes of the running configuration's metrics scraper, or None
        when nothing is scraped (no endpoints file, scraping off, or no plugin reads metrics)."""
        return self._scraper.interval if self._scraper is not None else None

    @property
    def endpoints(self) -> list[Endpoint]:
        """The current endpoint pool (from `set_endpoints` or the endpoints file)."""
        return list(self._endpoints)

    # -- scheduling -------------------------------------------------------------------------------

    def context(self) -> SchedulingContext:
        """A scheduling context for now (what plugins get on each call)."""
        self.activity.mark()
        return SchedulingContext(self.clock(), self.metrics_staleness, self._tracked, self)

    def schedule(
        self,
        request: SchedulingRequest,
        endpoints: Sequence[Endpoint] | None = None,
        *,
        dry_run: bool = False,
    ) -> SchedulingResult:
        """Choose endpoint(s) for `request` among `endpoints` (default: the current pool).

        Args:
            request: The request.
            endpoints: Candidates; None = the current pool.
            dry_run: Explain only: run filters, scorers and the picker, but no pre-request hook
                (no in-flight accounting, no speculative entries) and count no decision.

        Returns:
            The decision with every scorer's per-endpoint scores, the weights and the totals.

        Raises:
            NoEndpointError: No endpoints given, or a filter left none (the message names it).
            ValueError: Two endpoints share an id.
        """
        t0 = time.perf_counter()
        eps: Sequence[Endpoint] = self._endpoints if endpoints is None else endpoints
        if not eps:
            self.sched_metrics.no_endpoint.labels("input").inc()
            raise NoEndpointError("no endpoints to schedule on")
        self.activity.mark()
        ctx = SchedulingContext(self.clock(), self.metrics_staleness, self._tracked, self)
        result = self._runner.run(ctx, request, eps, dry_run)
        if dry_run:
            return result
        self.metrics.decisions.labels(result.targets[0].id).inc()
        self.sched_metrics.schedule_latency.observe(time.perf_counter() - t0)
        return result

    async def aschedule(
        self,
        request: SchedulingRequest,
        endpoints: Sequence[Endpoint] | None = None,
        *,
        dry_run: bool = False,
    ) -> SchedulingResult:
        """`schedule` without blocking the event loop.

        Request preparation (tokenization) runs in a worker thread and the rest of the
        pipeline, which is fast, on the loop; when a plugin does blocking I/O while scoring
        (``blocking_io``, e.g. a precise scorer on a Redis index) the whole pipeline runs in
        the worker thread.

        Args:
            request: The request.
            endpoints: Candidates; None = the current pool.
            dry_run: As in `schedule`.
        """
        flow = self.flow if not dry_run else None
        if flow is not None:
            # NOTE: flow control: wait for a turn while the pool is saturated, or be shed.
            await flow.wait_turn(request)
        try:
            return await self._aschedule(request, endpoints, dry_run)
        finally:
            if flow is not None:
                flow.admitted(request)

    async def _aschedule(
        self, request: SchedulingRequest, endpoints: Sequence[Endpoint] | None, dry_run: bool
    ) -> SchedulingResult:
        loop = asyncio.get_running_loop()
        if self._blocking:
            return await loop.run_in_executor(
                self._pool(), self._prepare_and_schedule, request, endpoints, dry_run
            )
        if self._preparers and not request.has_tokens:
            await loop.run_in_executor(self._pool(), self._prepare, request)
        return self.schedule(request, endpoints, dry_run=dry_run)

    def _prepare_and_schedule(
        self, request: SchedulingRequest, endpoints: Sequence[Endpoint] | None, dry_run: bool
    ) -> SchedulingResult:
        self._prepare(request)
        return self.schedule(request, endpoints, dry_run=dry_run)

    def _prepare(self, request: SchedulingRequest, *, expected_failure: bool = False) -> None:
        for p in self._preparers:
            try:
                p.prepare(request)
            except TokenizerNotFoundError as exc:
                # NOTE: warned once per model by the tokenizer registry; scoring says it again.
                logger.debug("request preparation by %r: %s", p, exc)
            except Exception as exc:
                # NOTE: scoring degrades on its own (e.g. a missing tokenizer scores 0); a
                # preparation failure must not fail the request.
                if expected_failure:
                    logger.debug("request preparation by %r: %s", p, exc)
                else:
                    logger.exception("request preparation by %r failed", p)

    def warm(self, models: Sequence[str]) -> None:
        """Load what preparing a request of each of `models` needs (tokenizers) now, so the
        first real request does not pay for it; failures are logged by the preparers' own
        paths, never raised (blocking: call it off the event loop)."""
        for model in models:
            self._prepare(SchedulingRequest(request_id=f"warm-up:{model}", model=model, prompt="."))
            # NOTE: and the chat path: the first render compiles the model's chat template
            # (tens of ms, on the first chat request's time to first token otherwise). A model
            # without a template fails here as its chat requests will; that is no warm-up error.
            chat = [{"role": "user", "content": "."}]
            self._prepare(
                SchedulingRequest(request_id=f"warm-up-chat:{model}", model=model, messages=chat),
                expected_failure=True,
            )

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                # NOTE: a plugin that waits while scheduling (a batch window) asks for more.
                wanted = [getattr(p, "min_workers", 0) for p in self._plugins.values()]
                self._executor = ThreadPoolExecutor(
                    max_workers=max([4, *wanted]), thread_name_prefix="kvaware-prepare"
                )
            return self._executor

    def post_response(
        self, request: SchedulingRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        """Run the post-response hooks once the response completed (or failed)."""
        for name, hook in self._post_response:
            try:
                hook.post_response(request, result, response)
            except Exception:
                logger.exception("post-response hook of plugin %s failed", name)
                self.sched_metrics.plugin_errors.labels(name, "post_response").inc()
        self.metrics_updated()  # a request left its pod: flow control looks again

    def first_token(self, request: SchedulingRequest, result: SchedulingResult) -> None:
        """Tell the plugins that listen for it (``first_token(now, request, result)``) that the
        request's first output token arrived now; call at most once per scheduled request,
        before `post_response`."""
        if not self._first_token:
            return
        now = self.clock()
        for obj in self._first_token:
            try:
                obj.first_token(now, request, result)
            except Exception:
                logger.exception("first-token listener %r failed", obj)
                self.sched_metrics.plugin_errors.labels(
                    str(getattr(obj, "name", type(obj).__name__)), "first_token"
                ).inc()
        self.metrics_updated()  # a prefill ended: flow control looks again

    def metrics_updated(self) -> None:
        """What the pool's saturation is read from changed: endpoint metrics were just scraped
        (the scrapers call this after each round), a prefill or a request ended, the pool
        changed. Flow control looks at the saturation again."""
        if self.flow is not None:
            self.flow.notify()

    # -- endpoints ----------------------------------------------------------------------------------

    def set_endpoints(self, endpoints: Sequence[Endpoint]) -> None:
        """Replace the endpoint pool; removed pods are purged from every index.

        Plugins that listen for pool changes (index owners, in-flight accounting, event
        subscribers) are told first, then the `kvaware_endpoints_changed` hook fires.
        """
        with self._lock:
            old = {e.id: e for e in self._endpoints}
            new = {e.id: e for e in endpoints}
            added = [e for i, e in new.items() if i not in old]
            removed = [e for i, e in old.items() if i not in new]
            self._endpoints = list(new.values())
            if self._scraper is not None:
                self._tracked = frozenset(new)
            self.sched_metrics.endpoints.set(len(new))
        if not added and not removed:
            return
        self.metrics_updated()
        logger.info("endpoints changed: +%s -%s", [e.id for e in added], [e.id for e in removed])
        for listener in self._listeners:
            try:
                listener.endpoints_changed(added, removed)
            except Exception:
                logger.exception("endpoints listener %r failed", listener)
        self.hooks.endpoints_changed(self, added, removed)

    def use_endpoints_file(
        self,
        path: str | Path,
        *,
        poll_interval: float = 1.0,
        scrape: bool = True,
        scrape_interval: float | None = None,
        scrape_timeout: float | None = None,
    ) -> None:
        """Take the pool from an endpoints file, reloaded when it changes, and (optionally)
        scrape every endpoint's ``/metrics``; both run between `start` and `stop`.

        The file is loaded now (so a bad file fails here, with the YAML path).

        Args:
            path: The endpoints YAML file.
            poll_interval: Seconds between checks of the file.
            scrape: Scrape pod metrics when a plugin reads them (off when something else
                writes ``endpoint.metrics``).
            scrape_interval: Seconds between scrape rounds, when a plugin reads metrics
                (default: `metrics_interval`).
            scrape_timeout: Per-request HTTP timeout in seconds.

        Raises:
            ConfigError: The file is missing or invalid.
        """
        from kvaware_scorer.scheduler.endpoints import EndpointsWatcher
        from kvaware_scorer.scheduler.scrape import MetricsScraper

        watcher = EndpointsWatcher(
            Path(path),
            self.set_endpoints,
            poll_interval=poll_interval,
            metrics=self.sched_metrics,
        )
        wanted = self.metrics_interval
        if scrape and wanted is not None:
            self._scraper = MetricsScraper(
                lambda: self._endpoints,
                interval=scrape_interval or wanted,
                timeout=scrape_timeout or 1.0,
                clock=self.clock,
                metrics=self.sched_metrics,
                staleness=self.metrics_staleness,
                activity=self.activity,
                on_round=self.metrics_updated,
            )
        self._watcher = watcher
        watcher.load()
        if self._running:
            watcher.start()
            if self._scraper is not None:
                self._scraper.start()

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start plugins' background work (KV-event subscribers), the endpoints-file watcher
        and the metrics scraper; idempotent."""
        with self._lock:
            if self._running:
                return
            # NOTE: the endpoints watcher and the metrics scraper start first and stay up even
            # when a plugin cannot start (e.g. its ZMQ port is taken): routing on load alone
            # beats not routing. The failure is logged, counted and raised once all is started.
            if self._watcher is not None:
                self._watcher.start()
            if self._scraper is not None:
                self._scraper.start()
            failures: list[str] = []
            for obj in self._lifecycle:
                try:
                    obj.start()
                except Exception as exc:
                    logger.exception("starting plugin %r failed", obj)
                    self.sched_metrics.plugin_errors.labels(
                        str(getattr(obj, "name", type(obj).__name__)), "start"
                    ).inc()
                    failures.append(f"{getattr(obj, 'name', obj)!s}: {exc}")
            self._running = True
        self.hooks.scheduler_started(self)
        if failures:
            raise KVAwareError("plugins failed to start: " + "; ".join(failures))

    def stop(self) -> None:
        """Stop everything `start` started, bounded in time; idempotent."""
        with self._lock:
            if not self._running:
                return
            self._running = False
            if self._scraper is not None:
                self._scraper.stop()
            if self._watcher is not None:
                self._watcher.stop()
            for obj in reversed(self._lifecycle):
                try:
                    obj.stop()
                except Exception:
                    logger.exception("stopping plugin %r failed", obj)
        self.hooks.scheduler_stopped(self)

    def close(self) -> None:
        """`stop`, then release plugin resources (indexers, worker pools)."""
        self.stop()
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None
        for obj in self._plugins.values():
            close = getattr(obj, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:
                    logger.exception("closing plugin %r failed", obj)

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
