"""Guided tours: commands that show kvaware working end to end, not parts of the library.

* `quickstart`: ``kvaware quickstart``, indexing and scoring in process (no extra needed).
* `demo`: ``kvaware demo``, precise vs random routing through the gateway (or Envoy + the
  epp) on live emulated pods; `demo_load` makes its load, `demo_run` runs one config.

Nothing in the package imports these modules except `kvaware_scorer.cli` (and the
re-exports ``kvaware_scorer.demo`` / ``kvaware_scorer.quickstart`` kept for old imports).
"""
