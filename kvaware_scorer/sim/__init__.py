"""vLLM fleet emulator: discrete-event and live (HTTP + ZMQ) modes."""
