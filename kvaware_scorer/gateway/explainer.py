"""``POST /v1/score``: what the scheduler would decide for a request, and why, with no side
effects.

The decision comes from `Scheduler.aschedule(..., dry_run=True)`: the configured profiles run
exactly as in routing (filters, clamped scorers, weighted totals, picker) but no pre-request hook
runs, so nothing is counted in flight and no speculative index entry is recorded. Ties are broken
by the picker as in routing (at random for ``max-score-picker``), so an explained pick among
equal totals may differ from a routed one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvaware_scorer.scheduler import Endpoint, ProfileResult, SchedulingResult

__all__ = ["explain"]


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


def explain(result: SchedulingResult, endpoints: Sequence[Endpoint]) -> dict[str, Any]:
    """A decision (from ``schedule(..., dry_run=True)``) among `endpoints`, as JSON.

    Returns:
        ``{"profile", "pick": {"endpoint", "name"}, "targets", "candidates", "weights",
        "scores": {scorer: {endpoint: score}}, "totals", "ranking": [{"endpoint", "name",
        "total", "scores"}] (best first), "profiles": {name: same fields}, "errors"}``.
    """
    by_id = {e.id: e for e in endpoints}
    primary = result.profile_results[result.profile]
    out: dict[str, Any] = {
        "profile": result.profile,
        "pick": {"endpoint": result.targets[0].id, "name": result.targets[0].name},
    }
    out.update(_profile_json(primary, by_id))
    out["profiles"] = {name: _profile_json(r, by_id) for name, r in result.profile_results.items()}
    out["errors"] = dict(result.errors)
    return out
