"""Entry point of a chat-template render worker process (see `sandbox.serve_worker`)."""

from kvaware_scorer.tokenization.sandbox import serve_worker

if __name__ == "__main__":  # pragma: no cover - runs in the worker process
    serve_worker()
