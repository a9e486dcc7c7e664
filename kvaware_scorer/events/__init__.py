"""vLLM KV events: wire decoding, application to the index, and the ZMQ subscriber."""
