"""OpenAI-compatible routing proxy (the production main job)."""
