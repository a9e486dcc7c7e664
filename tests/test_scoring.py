"""Scoring semantics: ratio of weighted consecutive blocks, tiers and the match-length blend."""

from __future__ import annotations

import pytest

from kvaware_scorer.index import PodMatch
from kvaware_scorer.scoring import prefix_score, score_matches


def test_ratio() -> None:
    """Score is weighted consecutive blocks over total full blocks."""
    assert prefix_score(3, 4, 16) == 0.75
    assert prefix_score(0, 4, 16) == 0.0
    assert prefix_score(5, 0, 16) == 0.0


def test_clamped() -> None:
    """Scores never exceed 1."""
    assert prefix_score(10, 4, 16) == 1.0


def test_match_length_blend() -> None:
    """w*min(1, tokens/scale)^2 + (1-w)*ratio, as upstream's prefix-cache-scorer."""
    # 2 of 4 blocks of 16 tokens = 32 tokens; scale 64 -> length term 0.25
    assert prefix_score(2, 4, 16, 0.5, 64) == pytest.approx(0.5 * 0.25 + 0.5 * 0.5)
    # a long match saturates the length term
    assert prefix_score(400, 500, 16, 1.0, 4096) == 1.0


def test_match_length_favours_long_prefixes() -> None:
    """With the blend, a long partial match beats a short full match (anti hot-spot)."""
    short_full = prefix_score(2, 2, 16, 0.5, 8192)
    long_partial = prefix_score(400, 500, 16, 0.5, 8192)
    assert long_partial > short_full


def test_score_matches_zero_for_unseen() -> None:
    """Pods without a match score 0 and keep their place in the result."""
    res = score_matches({"a": PodMatch(2, 1.6, {"cpu": 2})}, ["a", "b"], 4, 16)
    assert res["a"].score == pytest.approx(0.4)
    assert res["b"].score == 0.0
    assert dict(res["a"].tiers) == {"cpu": 2}
