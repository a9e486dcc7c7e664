"""Moved to `kvaware_scorer.tours.quickstart`; this name is kept so existing imports still work."""

from __future__ import annotations

from kvaware_scorer.tours.quickstart import register, run

__all__ = ["register", "run"]
