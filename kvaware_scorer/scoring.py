"""Longest-consecutive-prefix scoring: index matches -> a score in [0, 1] per candidate pod.

``ratio = sum of best-tier weights over the pod's consecutive run from block 0 / total full
blocks of the prompt``; optionally blended with an absolute match-length term as upstream's
``prefix-cache-scorer`` does (``matchLengthWeight`` w, ``matchLengthScaleTokens`` S):

    score = w * min(1, matched_tokens / S) ** 2 + (1 - w) * ratio

where ``matched_tokens = weighted blocks * block size``. A prompt shorter than one block, and a
pod never seen, score 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kvaware_scorer.index.base import PodMatch

__all__ = ["PodScore", "ScoreResult", "prefix_score", "score_matches"]


def prefix_score(
    weighted_blocks: float,
    total_blocks: int,
    block_size: int,
    match_length_weight: float = 0.0,
    match_length_scale_tokens: int = 8192,
) -> float:
    """Score of one pod; see the module docstring for the formula."""
    if total_blocks <= 0 or weighted_blocks <= 0:
        return 0.0
    ratio = min(1.0, weighted_blocks / total_blocks)
    if match_length_weight <= 0:
        return ratio
    length = min(1.0, weighted_blocks * block_size / match_length_scale_tokens)
    return min(1.0, match_length_weight * length * length + (1.0 - match_length_weight) * ratio)


@dataclass(slots=True)
class PodScore:
    """One pod's match and score."""

    score: float
    blocks: int = 0
    weight: float = 0.0
    tiers: Mapping[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class ScoreResult:
    """A scored request: per-pod details plus what the prompt looked like."""

    total_blocks: int
    block_size: int
    pods: dict[str, PodScore]
    tokens: int = 0
    error: str | None = None

    def scores(self) -> dict[str, float]:
        """Pod -> score."""
        return {p: s.score for p, s in self.pods.items()}


def score_matches(
    matches: Mapping[str, PodMatch],
    pods: Iterable[str],
    total_blocks: int,
    block_size: int,
    match_length_weight: float = 0.0,
    match_length_scale_tokens: int = 8192,
) -> dict[str, PodScore]:
    """Scores for every pod in `pods` (0 for those without a match)."""
    out: dict[str, PodScore] = {}
    for pod in pods:
        m = matches.get(pod)
        if m is None:
            out[pod] = PodScore(0.0)
            continue
        s = prefix_score(
            m.weight, total_blocks, block_size, match_length_weight, match_length_scale_tokens
        )
        out[pod] = PodScore(s, m.blocks, m.weight, m.tiers)
    return out
