"""Who may ask what: API keys for the inference routes, an admin credential for the rest.

Keys come from a file (one per line; blank lines and ``#`` comments skipped) or an environment
variable (separated by commas or whitespace), never from the YAML itself, so a config dump or a
log line can never hold one. Only SHA-256 digests are kept; a presented ``Authorization: Bearer
<key>`` is hashed and compared with every digest by `hmac.compare_digest` (no early exit, so the
time taken says nothing about which key, or how much of one, matched).

Access rules (see docs/gateway.md):

* inference routes (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``): open when
  no API key is configured, else an API key or an admin key;
* admin routes (``/v1/score``, ``/metrics``): an admin key when one is configured, else only
  clients on the loopback interface (the score route is a cache-membership oracle).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from kvaware_scorer.errors import ConfigError

__all__ = ["Access", "Credentials", "read_keys"]

#: Keys read from one source at most (a file of millions of lines is a mistake, not a key set).
MAX_KEYS = 4096
#: Longest key accepted (longer lines are not keys).
MAX_KEY_CHARS = 512


class Access(Enum):
    """The outcome of a credential check."""

    OK = "ok"
    MISSING = "missing"  # 401: no credential, or one that matches nothing
    FORBIDDEN = "forbidden"  # 403: a valid key without the needed role, or not loopback


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _split(text: str, where: str) -> list[str]:
    keys = [k for k in text.replace(",", " ").split() if k]
    if len(keys) > MAX_KEYS:
        raise ConfigError(f"more than {MAX_KEYS} keys", where)
    if any(len(k) > MAX_KEY_CHARS for k in keys):
        raise ConfigError(f"a key is longer than {MAX_KEY_CHARS} characters", where)
    return keys


def read_keys(
    file: Path | None, env: str | None, where: str, environ: Mapping[str, str] | None = None
) -> list[str]:
    """The keys of a file and/or an environment variable (both may be given).

    Raises:
        ConfigError: The file cannot be read, the variable is not set, or a source holds no
            key. The message names the file or variable, never a key.
    """
    environ = os.environ if environ is None else environ
    keys: list[str] = []
    if file is not None:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the key file {file}: {exc}", where) from None
        lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
        found = _split("\n".join(ln for ln in lines if ln), f"{where} ({file})")
        if not found:
            raise ConfigError(f"the key file {file} holds no key", where)
        keys += found
    if env is not None:
        value = environ.get(env)
        if value is None:
            raise ConfigError(f"the environment variable {env} is not set", where)
        found = _split(value, f"{where} (${env})")
        if not found:
            raise ConfigError(f"the environment variable {env} holds no key", where)
        keys += found
    return keys


class _KeySet:
    """Digests of a set of keys; membership in constant time per stored key."""

    __slots__ = ("_digests",)

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(sorted({_digest(k) for k in keys}))

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def holds(self, digest: bytes) -> bool:
        found = False
        for d in self._digests:
            # NOTE: `|` not `or`: every digest is compared, whichever matches.
            found = hmac.compare_digest(d, digest) | found
        return found

    def __repr__(self) -> str:
        return f"<{len(self._digests)} key(s)>"


def _loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Credentials:
    """The API and admin key sets of a gateway.

    Attributes:
        api: Keys accepted on the inference routes (empty = those routes are open).
        admin: Keys accepted everywhere, required on the admin routes (empty = admin routes
            are served to loopback clients only).
    """

    api: _KeySet
    admin: _KeySet

    @classmethod
    def from_keys(cls, api: Iterable[str] = (), admin: Iterable[str] = ()) -> Credentials:
        """Credentials from key strings."""
        return cls(_KeySet(api), _KeySet(admin))

    @classmethod
    def load(
        cls,
        api_file: Path | None,
        api_env: str | None,
        admin_file: Path | None,
        admin_env: str | None,
        environ: Mapping[str, str] | None = None,
    ) -> Credentials:
        """Read the key sources of a gateway config.

        Raises:
            ConfigError: A source given but unreadable or empty.
        """
        return cls.from_keys(
            read_keys(api_file, api_env, "apiKeyFile/apiKeyEnv", environ),
            read_keys(admin_file, admin_env, "adminKeyFile/adminKeyEnv", environ),
        )

    @staticmethod
    def _presented(authorization: str | None) -> bytes | None:
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        return _digest(token)

    def check_inference(self, authorization: str | None) -> Access:
        """Access to an inference route for a request's ``Authorization`` header."""
        if not self.api:
            return Access.OK
        digest = self._presented(authorization)
        if digest is None:
            return Access.MISSING
        # NOTE: both sets are always checked (no short cut telling which set matched).
        ok = self.api.holds(digest) | self.admin.holds(digest)
        return Access.OK if ok else Access.MISSING

    def check_admin(self, authorization: str | None, remote: str | None) -> Access:
        """Access to an admin route for a request's ``Authorization`` header and peer."""
        if not self.admin:
            return Access.OK if _loopback(remote) else Access.FORBIDDEN
        digest = self._presented(authorization)
        if digest is None:
            return Access.MISSING
        admin = self.admin.holds(digest)
        api = self.api.holds(digest)
        if admin:
            return Access.OK
        return Access.FORBIDDEN if api else Access.MISSING
