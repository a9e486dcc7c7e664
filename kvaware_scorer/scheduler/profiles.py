"""One scheduling call through the configured profiles: admission, the profile handler's loop,
filter -> score -> pick in each profile, and the pre-request hooks.

`ProfileRunner.run` is the per-request pipeline; it holds the plugin objects by role and knows
nothing of where endpoints, metrics or threads come from (`kvaware_scorer.scheduler.pipeline`
owns those). Per profile: filters run in order (an empty result raises `NoEndpointError` naming
the filter), every scorer's scores are clamped to [0, 1] (endpoints a scorer leaves out score
0), the total is ``sum(weight x score)`` (not divided by the weights' sum, as upstream), and the
picker chooses. `build_profiles` slots the configured profiles' plugin objects.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvaware_scorer.errors import ConfigError, NoEndpointError, RequestRejectedError
from kvaware_scorer.scheduler.metrics import SchedulerMetrics
from kvaware_scorer.scheduler.resolved import SchedulerConfig
from kvaware_scorer.scheduler.types import (
    Endpoint,
    Filter,
    Picker,
    PreRequest,
    ProfileHandler,
    ProfileResult,
    ProfileView,
    SchedulingContext,
    SchedulingRequest,
    SchedulingResult,
    ScoredEndpoint,
    Scorer,
)

__all__ = ["Profile", "ProfileRunner", "build_profiles", "single_result"]

logger = logging.getLogger("kvaware_scorer.scheduler.pipeline")


@dataclass
class Profile:
    """A configured profile with its plugin objects."""

    name: str
    filters: list[tuple[str, Filter]]
    scorers: list[tuple[str, float, Scorer]]
    picker: Picker


def build_profiles(
    config: SchedulerConfig, plugins: Mapping[str, object]
) -> tuple[dict[str, Profile], dict[str, ProfileView]]:
    """The configured profiles with their plugin objects, and the views handlers get."""
    profiles = {
        prof.name: Profile(
            prof.name,
            [(f, plugins[f]) for f in prof.filters],  # type: ignore[misc]
            [(s.name, s.weight, plugins[s.name]) for s in prof.scorers],  # type: ignore[misc]
            plugins[prof.picker],  # type: ignore[arg-type]
        )
        for prof in config.profiles.values()
    }
    views = {
        p.name: ProfileView(
            p.name,
            tuple(p.filters),
            tuple((s.name, s.weight) for s in p.scorers),
            p.picker,
        )
        for p in config.profiles.values()
    }
    return profiles, views


class ProfileRunner:
    """Runs one scheduling call: admission, profiles chosen by the handler, pre-request hooks.

    Args:
        profiles: Profiles by name (`build_profiles`).
        views: Their views, as profile handlers see them.
        handler: The profile handler.
        admitters: (name, plugin) of every admitter (``admit(ctx, request, endpoints)``).
        pre_request: (name, plugin) of every pre-request hook, in configuration order.
        metrics: Where "no endpoint" outcomes and plugin errors are counted.
    """

    def __init__(
        self,
        profiles: Mapping[str, Profile],
        views: Mapping[str, ProfileView],
        handler: ProfileHandler,
        admitters: Sequence[tuple[str, Any]],
        pre_request: Sequence[tuple[str, PreRequest]],
        metrics: SchedulerMetrics,
    ) -> None:
        self.profiles = profiles
        self.views = views
        self.handler = handler
        self.admitters = admitters
        self.pre_request = pre_request
        self.metrics = metrics

    def run(
        self,
        ctx: SchedulingContext,
        request: SchedulingRequest,
        eps: Sequence[Endpoint],
        dry_run: bool,
    ) -> SchedulingResult:
        """The decision for `request` among `eps` (see `Scheduler.schedule`)."""
        self.admit(ctx, request, eps)
        results, errors, failed = self.run_profiles(ctx, request, eps)
        primary = self.handler.process_results(ctx, request, results)
        if primary in failed:
            raise failed[primary]
        if primary not in results:
            raise ConfigError(
                f"profile handler chose a primary profile that did not run: {primary!r}"
            )
        for name in failed:
            del results[name]
        pr = results[primary]
        result = SchedulingResult(
            targets=pr.targets,
            profile=primary,
            candidates=pr.candidates,
            scores=pr.scores,
            weights=pr.weights,
            totals=pr.totals,
            profile_results=results,
            errors=errors,
            dry_run=dry_run,
            failed_profiles={name: str(exc) for name, exc in failed.items()},
        )
        if not dry_run:
            self.run_pre_request(ctx, request, result)
        return result

    def admit(
        self, ctx: SchedulingContext, request: SchedulingRequest, eps: Sequence[Endpoint]
    ) -> None:
        """Ask every admitter; the first refusal sheds the request (429)."""
        for name, admitter in self.admitters:
            reason = admitter.admit(ctx, request, eps)
            if reason:
                # NOTE: upstream's admission plugins shed before scheduling (429).
                self.metrics.no_endpoint.labels("admission").inc()
                raise RequestRejectedError(f"{name}: {reason}", 429)

    def run_profiles(
        self, ctx: SchedulingContext, request: SchedulingRequest, eps: Sequence[Endpoint]
    ) -> tuple[dict[str, ProfileResult], dict[str, str], dict[str, NoEndpointError]]:
        """Run the profiles the handler picks until it picks none: (results, scorer errors,
        profiles that found no endpoint)."""
        results: dict[str, ProfileResult] = {}
        errors: dict[str, str] = {}
        failed: dict[str, NoEndpointError] = {}
        for _ in range(len(self.profiles) + 1):
            names = self.handler.pick_profiles(ctx, request, self.views, results)
            if not names:
                break
            for name in names:
                if name in results:
                    raise ConfigError(f"profile handler ran profile {name!r} twice")
                prof = self.profiles.get(name)
                if prof is None:
                    raise ConfigError(f"profile handler chose an unknown profile {name!r}")
                try:
                    results[name] = self.run_profile(prof, ctx, request, eps, errors)
                except NoEndpointError as exc:
                    # NOTE: as upstream, a profile that finds no endpoint leaves an empty result
                    # and the handler decides (P/D goes on decode-only without prefill pods).
                    failed[name] = exc
                    results[name] = ProfileResult(name, [], [], {}, {}, {})
        if not results:
            self.metrics.no_endpoint.labels("handler").inc()
            raise NoEndpointError("the profile handler ran no profile")
        return results, errors, failed

    def run_profile(
        self,
        prof: Profile,
        ctx: SchedulingContext,
        request: SchedulingRequest,
        endpoints: Sequence[Endpoint],
        errors: dict[str, str],
    ) -> ProfileResult:
        """Filter -> score -> pick in one profile (a failing scorer scores 0 and is noted in
        `errors`)."""
        cands: Sequence[Endpoint] = endpoints
        for fname, flt in prof.filters:
            before = len(cands)
            cands = flt.filter(ctx, request, cands)
            if not cands:
                self.metrics.no_endpoint.labels("filter").inc()
                raise NoEndpointError(
                    f"no endpoint left after filter {fname!r} of profile {prof.name!r} "
                    f"({before} endpoint(s) before it)"
                )
        ids = [e.id for e in cands]
        if len(set(ids)) != len(ids):
            raise ValueError(f"endpoints share an id: {sorted(i for i in ids if ids.count(i) > 1)}")
        totals = dict.fromkeys(ids, 0.0)
        scores: dict[str, dict[str, float]] = {}
        weights: dict[str, float] = {}
        for sname, weight, scorer in prof.scorers:
            try:
                raw = scorer.score(ctx, request, cands)
            except Exception as exc:
                logger.exception("scorer %s failed; scoring 0 for this request", sname)
                self.metrics.plugin_errors.labels(sname, "score").inc()
                errors[sname] = f"{type(exc).__name__}: {exc}"
                raw = {}
            clamped: dict[str, float] = {}
            get = raw.get
            for eid in ids:
                v = get(eid, 0.0)
                # NOTE: NaN fails both comparisons and lands on 0.0, like a missing score.
                if not 0.0 <= v <= 1.0:
                    v = 1.0 if v > 1.0 else 0.0
                clamped[eid] = v
                totals[eid] += weight * v
            scores[sname] = clamped
            weights[sname] = weight
        scored = [ScoredEndpoint(e, totals[e.id]) for e in cands]
        targets = prof.picker.pick(ctx, request, scored)
        if not targets:
            self.metrics.no_endpoint.labels("picker").inc()
            raise NoEndpointError(f"the picker of profile {prof.name!r} chose no endpoint")
        return ProfileResult(prof.name, list(targets), ids, scores, weights, totals)

    def run_pre_request(
        self, ctx: SchedulingContext, request: SchedulingRequest, result: SchedulingResult
    ) -> None:
        """Run every pre-request hook; a failing hook is logged and counted, never raised."""
        for name, hook in self.pre_request:
            try:
                hook.pre_request(ctx, request, result)
            except Exception:
                logger.exception("pre-request hook of plugin %s failed", name)
                self.metrics.plugin_errors.labels(name, "pre_request").inc()


def single_result(handler: str, results: Mapping[str, ProfileResult]) -> str:
    """The primary profile of a handler that runs one profile per request: the one that ran.

    Raises:
        NoEndpointError: Not exactly one profile ran (naming `handler`).
    """
    if len(results) != 1:
        raise NoEndpointError(f"{handler}: runs a single profile per request, {len(results)} ran")
    return next(iter(results))
