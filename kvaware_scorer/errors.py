"""The error tree: one root (`KVAwareError`) and a few documented branches.

Every error raised on purpose by kvaware derives from `KVAwareError`, so callers that embed the
scorer can catch one type. Branches also derive from the matching builtin (`ValueError`,
`LookupError`, `ConnectionError`) so generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "ConfigError",
    "ConfigErrorGroup",
    "EventDecodeError",
    "KVAwareError",
    "KeyDerivationError",
    "NoEndpointError",
    "RequestRejectedError",
    "TokenizerNotFoundError",
]


class KVAwareError(Exception):
    """Root of every error kvaware raises on purpose."""


class ConfigError(KVAwareError, ValueError):
    """Invalid configuration; `path` names the offending location (YAML path or field path).

    Printed as ``[source:line: ]path: message``, e.g.
    ``gw.yaml:3: maxBodyBytess: unknown key; did you mean 'maxBodyBytes'? (valid: ...)``.

    Args:
        message: What is wrong.
        path: Dotted/indexed location of the problem, e.g. ``plugins[2].parameters.blockSize``.
        line: 1-based line in the YAML file, when the loader knows it.
        source: The file the configuration was read from, when known.
    """

    def __init__(
        self,
        message: str,
        path: str | None = None,
        *,
        line: int | None = None,
        source: str | None = None,
    ) -> None:
        self.path = path
        self.message = message
        self.line = line
        self.source = source
        body = f"{path}: {message}" if path else message
        where = (
            f"{source}:{line}" if source and line else source or (f"line {line}" if line else "")
        )
        super().__init__(f"{where}: {body}" if where else body)


class ConfigErrorGroup(ConfigError):
    """Several configuration errors at once; `errors` lists them all, and so does the message
    (one error per line, in document order). A group of one reads as that error.

    Args:
        errors: The errors found, in document order.
    """

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        if len(errors) == 1:
            e = errors[0]
            super().__init__(e.message, e.path, line=e.line, source=e.source)
            return
        listing = "\n".join(f"  {e}" for e in errors)
        super().__init__(f"{len(errors)} errors:\n{listing}")


class KeyDerivationError(KVAwareError, ValueError):
    """Block keys cannot be derived for a request (e.g. vllm key mode without a LoRA path)."""


class EventDecodeError(KVAwareError, ValueError):
    """A KV-event payload could not be decoded; `reason` is a short, countable label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class BackendUnavailableError(KVAwareError, ConnectionError):
    """The index backend (e.g. Redis) cannot be reached or timed out."""


class TokenizerNotFoundError(KVAwareError, LookupError):
    """No tokenizer could be found for a model; the message lists every place searched."""


class NoEndpointError(KVAwareError):
    """Scheduling found no endpoint (a filter left none, or none were given)."""


class RequestRejectedError(NoEndpointError):
    """Admission or flow control turned the request away (shed); `status` is the HTTP status
    a front door answers with (429 when shed for load or SLO, 503 when no endpoint exists)."""

    def __init__(self, message: str, status: int = 429) -> None:
        super().__init__(message)
        self.status = status
