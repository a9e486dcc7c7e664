"""``POST /v1/score``: what the scheduler would decide for a request, and why, with no side
effects.

`Scheduler.schedule` runs the pre-request hooks after the pick (in-flight accounting,
speculative index entries), which a question must not trigger. `explain` therefore runs the
configured profiles itself through the scheduler's public plugin objects, with the pipeline's
semantics: the profile handler's loop, filters in order (an empty result names the filter),
every scorer clamped to [0, 1] (a failing scorer scores 0, as in routing), ``total = sum(weight
x score)`` and the profile's picker. Ties are broken by the picker as in routing (at random for
``max-score-picker``), so an explained pick among equal totals may differ from a routed one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvaware_scorer.errors import ConfigError, NoEndpointError
from kvaware_scorer.scheduler import (
    Endpoint,
    Filter,
    Picker,
    ProfileHandler,
    ProfileResult,
    ProfileView,
    Scheduler,
    SchedulingContext,
    SchedulingRequest,
    ScoredEndpoint,
    Scorer,
)

__all__ = ["explain"]


def _run_profile(
    scheduler: Scheduler,
    view: ProfileView,
    ctx: SchedulingContext,
    request: SchedulingRequest,
    endpoints: Sequence[Endpoint],
    errors: dict[str, str],
) -> ProfileResult:
    cands: Sequence[Endpoint] = endpoints
    for fname in view.filters:
        flt: Filter = scheduler.plugin(fname)
        before = len(cands)
        cands = flt.filter(ctx, request, cands)
        if not cands:
            raise NoEndpointError(
                f"no endpoint left after filter {fname!r} of profile {view.name!r} "
                f"({before} endpoint(s) before it)"
            )
    ids = [e.id for e in cands]
    totals = dict.fromkeys(ids, 0.0)
    scores: dict[str, dict[str, float]] = {}
    weights: dict[str, float] = {}
    for sname, weight in view.scorers:
        scorer: Scorer = scheduler.plugin(sname)
        try:
            raw = scorer.score(ctx, request, cands)
        except Exception as exc:
            errors[sname] = f"{type(exc).__name__}: {exc}"
            raw = {}
        clamped: dict[str, float] = {}
        for eid in ids:
            v = raw.get(eid, 0.0)
            if not 0.0 <= v <= 1.0:
                v = 1.0 if v > 1.0 else 0.0
            clamped[eid] = v
            totals[eid] += weight * v
        scores[sname] = clamped
        weights[sname] = weight
    picker: Picker = scheduler.plugin(view.picker)
    targets = picker.pick(ctx, request, [ScoredEndpoint(e, totals[e.id]) for e in cands])
    if not targets:
        raise NoEndpointError(f"the picker of profile {view.name!r} chose no endpoint")
    return ProfileResult(view.name, list(targets), ids, scores, weights, totals)


def _profile_json(pr: ProfileResult, by_id: dict[str, Endpoint]) -> dict[str, Any]:
    ranking = sorted(pr.candidates, key=lambda eid: (-pr.totals[eid], eid))
    return {
        "targets": [e.id for e in pr.targets],
        "candidates": list(pr.candidates),
        "weights": dict(pr.weights),
        "scores": {name: dict(s) for name, s in pr.scores.items()},
        "totals": dict(pr.totals),
        "ranking": [
            {
                "endpoint": eid,
                "name": by_id[eid].name if eid in by_id else eid,
                "total": pr.totals[eid],
                "scores": {name: s[eid] for name, s in pr.scores.items()},
            }
            for eid in ranking
        ],
    }


def explain(
    scheduler: Scheduler, request: SchedulingRequest, endpoints: Sequence[Endpoint]
) -> dict[str, Any]:
    """The scheduler's decision for `request` among `endpoints`, without running any hook.

    Tokenization, when needed, must have happened already (the gateway prepares the request
    off the event loop first).

    Returns:
        ``{"profile", "pick": {"endpoint", "name"}, "targets", "candidates", "weights",
        "scores": {scorer: {endpoint: score}}, "totals", "ranking": [{"endpoint", "name",
        "total", "scores"}] (best first), "profiles": {name: same fields}, "errors"}``.

    Raises:
        NoEndpointError: No endpoints, or a filter or picker left none.
        ConfigError: The profile handler chose a profile that does not exist.
    """
    if not endpoints:
        raise NoEndpointError("no endpoints to schedule on")
    ctx = scheduler.context()
    handler: ProfileHandler = scheduler.plugin(scheduler.config.profile_handler)
    views = scheduler.profiles
    results: dict[str, ProfileResult] = {}
    errors: dict[str, str] = {}
    for _ in range(len(views) + 1):
        names = handler.pick_profiles(ctx, request, views, results)
        if not names:
            break
        for name in names:
            if name in results or name not in views:
                raise ConfigError(f"profile handler chose profile {name!r} again or unknown")
            results[name] = _run_profile(scheduler, views[name], ctx, request, endpoints, errors)
    if not results:
        raise NoEndpointError("the profile handler ran no profile")
    primary = handler.process_results(ctx, request, results)
    if primary not in results:
        raise ConfigError(f"profile handler chose a primary profile that did not run: {primary!r}")
    by_id = {e.id: e for e in endpoints}
    pr = results[primary]
    out: dict[str, Any] = {
        "profile": primary,
        "pick": {"endpoint": pr.targets[0].id, "name": pr.targets[0].name},
    }
    out.update(_profile_json(pr, by_id))
    out["profiles"] = {name: _profile_json(r, by_id) for name, r in results.items()}
    out["errors"] = errors
    return out
