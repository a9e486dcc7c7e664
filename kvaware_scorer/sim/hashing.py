"""Emulated engines' block hashes: vLLM's exact sha256 chain, or a fast chained xxh3.

vLLM hashes each full block as ``H((parent digest or NONE_HASH, block tokens, extra keys))`` and
publishes the digest's low 64 bits. Two engine hashers follow that contract:

* ``sha256``: vLLM's default algorithm, byte for byte (delegates to `VllmKeyer`); events carry
  the very hashes a real vLLM with the same tokens (and unset PYTHONHASHSEED) would send.
* ``xxh3`` (default, ~20x faster): ``digest_i = xxh3_64(le32 tokens of block i, seed=digest_{i-1})``
  from a root derived from the namespace (LoRA name or nothing, and ``cache_salt``). The root is
  deliberately unrelated to the indexer's derived keys, so the indexer cannot pass by accident.

Both chain on the full previous digest and give a 64-bit event value, like vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import xxhash

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.keys import VllmKeyer, u64

__all__ = ["ENGINE_HASHES", "BlockHasher", "Sha256BlockHasher", "Xxh3BlockHasher", "make_hasher"]

ENGINE_HASHES = ("xxh3", "sha256")


class BlockHasher(Protocol):
    """Chained block hashes of one engine configuration."""

    block_size: int

    def chain(
        self,
        tokens: np.ndarray,
        start_block: int,
        parent: object | None,
        lora_name: str | None,
        cache_salt: str | None,
    ) -> tuple[list[int], object | None]:
        """Hash the full blocks of `tokens` (which start at block `start_block`).

        Args:
            tokens: Token ids (int32), a whole number of blocks or more (the tail is ignored).
            start_block: Index of the first block of `tokens` in the request.
            parent: The chain state after the previous block (None for block 0).
            lora_name: The request's LoRA adapter, if any.
            cache_salt: The request's cache salt, if any.

        Returns:
            The 64-bit event values of the blocks and the chain state after the last one.
        """
        ...


class Xxh3BlockHasher:
    """Fast chained xxh3-64 block hashes (state = the 64-bit value itself)."""

    def __init__(self, block_size: int, seed: str = "") -> None:
        self.block_size = block_size
        self._seed = seed
        self._roots: dict[tuple[str | None, str | None], int] = {}

    def root(self, lora_name: str | None, cache_salt: str | None) -> int:
        """Parent value of block 0 for a namespace."""
        key = (lora_name or None, cache_salt or None)
        value = self._roots.get(key)
        if value is None:
            text = f"kvaware-sim-engine\x00{self._seed}\x00{lora_name or ''}\x00{cache_salt or ''}"
            value = int(xxhash.xxh3_64_intdigest(text.encode("utf-8")))
            self._roots[key] = value
        return value

    def chain(
        self,
        tokens: np.ndarray,
        start_block: int,
        parent: object | None,
        lora_name: str | None,
        cache_salt: str | None,
    ) -> tuple[list[int], object | None]:
        bs = self.block_size
        n = len(tokens) // bs
        if n == 0:
            return [], parent
        data = np.ascontiguousarray(tokens[: n * bs], dtype="<u4").tobytes()
        key = self.root(lora_name, cache_salt) if parent is None else int(parent)  # type: ignore[call-overload]
        h = xxhash.xxh3_64_intdigest
        step = 4 * bs
        out: list[int] = []
        append = out.append
        for off in range(0, n * step, step):
            key = h(data[off : off + step], key)
            append(key)
        return out, key


class Sha256BlockHasher:
    """vLLM's default block hash (sha256 over pickle), via `VllmKeyer` (state = full digest)."""

    def __init__(self, block_size: int, seed: str = "") -> None:
        self.block_size = block_size
        self._seed = seed or None
        self._keyers: dict[str | None, VllmKeyer] = {}

    def _keyer(self, lora_name: str | None) -> VllmKeyer:
        keyer = self._keyers.get(lora_name)
        if keyer is None:
            # vLLM hashes the adapter path too; emulated adapters live at /adapters/<name>.
            paths = {lora_name: f"/adapters/{lora_name}"} if lora_name else None
            keyer = VllmKeyer(self.block_size, "sha256", self._seed, paths)
            self._keyers[lora_name] = keyer
        return keyer

    def chain(
        self,
        tokens: np.ndarray,
        start_block: int,
        parent: object | None,
        lora_name: str | None,
        cache_salt: str | None,
    ) -> tuple[list[int], object | None]:
        ids: Sequence[int] = tokens.tolist()
        parent_digest = parent if isinstance(parent, bytes) else None
        keyer = self._keyer(lora_name or None)
        digests = keyer.digests(ids, lora_name, cache_salt, parent_digest, start_block)
        if not digests:
            return [], parent
        return [u64(d) for d in digests], digests[-1]


def make_hasher(name: str, block_size: int, seed: str = "") -> BlockHasher:
    """The engine hasher `name` (``xxh3`` or ``sha256``).

    Raises:
        ConfigError: Unknown name.
    """
    if name == "xxh3":
        return Xxh3BlockHasher(block_size, seed)
    if name == "sha256":
        return Sha256BlockHasher(block_size, seed)
    raise ConfigError(f"unknown engine hash {name!r}; valid: {list(ENGINE_HASHES)}", "engineHash")
