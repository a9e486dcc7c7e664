"""Token ids -> chained 64-bit block keys: our fast ``derived`` keys and vLLM's exact hashes.

Only full blocks are keyed (vLLM never caches a partial block). Keys are chained: block ``i``'s
key depends on every token before it, so equal keys mean equal prefixes.

Two key modes:

* ``derived`` (default): ``key_i = xxh3_64(le32 tokens of block i, seed=key_{i-1})`` with
  ``key_{-1}`` a root seeded by the model (or the LoRA name when one is given), the request's
  ``cache_salt`` and the configured ``hashSeed``. Different models, adapters and salts never
  share keys, and nothing about vLLM's hashing needs to be known: ingestion derives the same
  keys from each event's ``token_ids``.
* ``vllm``: vLLM's own block hash (``vllm/v1/core/kv_cache_utils.py``): ``digest_i =
  H((digest_{i-1} or NONE_HASH, tuple(tokens), extra_keys))`` for H in sha256 (over pickle,
  vLLM's default), sha256_cbor, xxhash and xxhash_cbor; ``NONE_HASH = H(seed)`` with seed the
  pods' PYTHONHASHSEED or "vllm-none-hash"; the event value is the digest's low 64 bits.
"""

from __future__ import annotations

import array
import hashlib
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NewType, Protocol

import xxhash

from kvaware_scorer.errors import ConfigError, KeyDerivationError

__all__ = [
    "DEFAULT_NONE_HASH_SEED",
    "DEFAULT_VLLM_HASH_GENERATION",
    "VLLM_HASH_GENERATIONS",
    "BlockKey",
    "BlockKeyer",
    "DerivedKeyer",
    "EngineHash",
    "VllmKeyer",
    "engine_hash_from_wire",
    "make_keyer",
    "u64",
]

#: A key in our index (unsigned 64-bit).
BlockKey = NewType("BlockKey", int)
#: A block hash as vLLM publishes it in KV events (unsigned 64-bit; low 64 bits of the digest).
EngineHash = NewType("EngineHash", int)

#: vLLM >= 0.29 seeds NONE_HASH with this string when PYTHONHASHSEED is unset (sha256 variants).
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"

_U64 = (1 << 64) - 1


def u64(digest: bytes) -> int:
    """Low 64 bits of a digest read big-endian, as vLLM's ``maybe_convert_block_hash`` does."""
    return int.from_bytes(digest[-8:], "big")


def engine_hash_from_wire(value: int | bytes) -> EngineHash:
    """Normalize a wire hash (msgpack int of any width, or digest bytes) to an `EngineHash`.

    Raises:
        ValueError: For negative ints, ints wider than 64 bits' worth of digest, or empty bytes.
    """
    if isinstance(value, bool):
        raise ValueError("hash must be int or bytes, got bool")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("negative block hash")
        return EngineHash(value & _U64)
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if not raw:
            raise ValueError("empty block hash")
        return EngineHash(int.from_bytes(raw, "big") & _U64)
    raise ValueError(f"hash must be int or bytes, got {type(value).__name__}")


class BlockKeyer(Protocol):
    """Turns token ids into chained block keys for one configuration."""

    block_size: int
    mode: str

    def root(self, model: str, lora_name: str | None = None, cache_salt: str | None = None) -> int:
        """The parent value of block 0 for this request's namespace."""
        ...

    def block_keys(
        self,
        token_ids: Sequence[int],
        model: str,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> list[int]:
        """Keys of every full block of `token_ids`, from block 0."""
        ...


def _pack_tokens(token_ids: Sequence[int]) -> bytes:
    try:
        return array.array("I", token_ids).tobytes()
    except (OverflowError, TypeError) as exc:
        raise KeyDerivationError(f"token ids must be ints in [0, 2**32): {exc}") from None


class DerivedKeyer:
    """The default fast chained keys (xxh3-64, seeded by namespace and parent).

    Args:
        block_size: Tokens per block.
        hash_seed: Mixed into every root, so two deployments can keep disjoint key spaces.
    """

    mode = "derived"

    def __init__(self, block_size: int = 16, hash_seed: str = "") -> None:
        if block_size < 1:
            raise ConfigError("must be >= 1", "tokenProcessorConfig.blockSize")
        self.block_size = block_size
        self._seed = hash_seed
        self._roots: dict[tuple[str, str | None, str | None], int] = {}

    def root(self, model: str, lora_name: str | None = None, cache_salt: str | None = None) -> int:
        """Root seed: adapters key by LoRA name (as upstream), else by model name."""
        salt = cache_salt or None
        ident = (model, lora_name or None, salt)
        cached = self._roots.get(ident)
        if cached is not None:
            return cached
        namespace = f"lora\x00{lora_name}" if lora_name else f"model\x00{model}"
        text = f"kvaware\x00{self._seed}\x00{namespace}\x00salt\x00{salt or ''}"
        value: int = xxhash.xxh3_64_intdigest(text.encode("utf-8"))
        if len(self._roots) > 4096:
            self._roots.clear()
        self._roots[ident] = value
        return value

    def chain(
        self, parent: int, token_ids: Sequence[int], block_size: int | None = None
    ) -> list[int]:
        """Keys of the full blocks of `token_ids`, chained from `parent` (a key or a root)."""
        bs = block_size or self.block_size
        total = len(token_ids)
        n = total // bs
        if n == 0:
            return []
        h = xxhash.xxh3_64_intdigest
        if n == 1 and total == bs:  # a decode continuation: one block, no slicing
            return [h(_pack_tokens(token_ids), parent)]
        data = _pack_tokens(token_ids if total == n * bs else token_ids[: n * bs])
        step = 4 * bs
        out: list[int] = []
        append = out.append
        key = parent
        for off in range(0, n * step, step):
            key = h(data[off : off + step], key)
            append(key)
        return out

    def block_keys(
        self,
        token_ids: Sequence[int],
        model: str,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> list[int]:
        return self.chain(self.root(model, lora_name, cache_salt), token_ids)


def _pickle_sha256(obj: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _cbor_sha256(obj: Any) -> bytes:
    import cbor2

    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def _pickle_xxh(obj: Any) -> bytes:
    return bytes(xxhash.xxh3_128_digest(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)))


def _cbor_xxh(obj: Any) -> bytes:
    import cbor2

    return bytes(xxhash.xxh3_128_digest(cbor2.dumps(obj, canonical=True)))


_VLLM_HASHES: dict[str, Callable[[Any], bytes]] = {
    "sha256": _pickle_sha256,
    "sha256_cbor": _cbor_sha256,
    "xxhash": _pickle_xxh,
    "xxhash_cbor": _cbor_xxh,
}


#: vLLM's block-hash generations: which extra keys go into a block's hash.
#: ``0.31`` (0.31 and later): tagged, ``("lora", name, path)`` and ``("cache_salt", salt)``.
#: ``pre-0.31``: bare, the LoRA name and the salt string themselves (the events' form).
VLLM_HASH_GENERATIONS = ("0.31", "pre-0.31")
DEFAULT_VLLM_HASH_GENERATION = "0.31"


class VllmKeyer:
    """Reproduces vLLM's block hashes and returns their event values.

    Args:
        block_size: vLLM's (hash) block size.
        hash_algorithm: ``--prefix-caching-hash-algo``.
        hash_seed: The pods' ``PYTHONHASHSEED``; ``""``/None = unset.
        lora_adapters: LoRA name -> adapter path (vLLM 0.31+ hashes the path too).
        generation: The pods' hashing generation (`VLLM_HASH_GENERATIONS`); default the
            newest.

    Raises:
        ConfigError: Unknown algorithm, or xxhash without a seed (vLLM then seeds randomly per
            process, so its hashes cannot be reproduced).
    """

    mode = "vllm"

    def __init__(
        self,
        block_size: int = 16,
        hash_algorithm: str = "sha256",
        hash_seed: str | None = None,
        lora_adapters: Mapping[str, str] | None = None,
        generation: str = DEFAULT_VLLM_HASH_GENERATION,
    ) -> None:
        if generation not in VLLM_HASH_GENERATIONS:
            raise ConfigError(
                f"unknown vLLM hash generation {generation!r}; valid: {list(VLLM_HASH_GENERATIONS)}",
                "tokenProcessorConfig.vllmHashGeneration",
            )
        self.generation = generation
        self._tagged = generation == "0.31"
        fn = _VLLM_HASHES.get(hash_algorithm)
        if fn is None:
            raise ConfigError(
                f"unknown hash algorithm {hash_algorithm!r}; valid: {sorted(_VLLM_HASHES)}",
                "tokenProcessorConfig.hashAlgorithm",
            )
        if not hash_seed and hash_algorithm.startswith("xxhash"):
            raise ConfigError(
                "vLLM seeds xxhash randomly per process unless PYTHONHASHSEED is set; "
                "set hashSeed to the pods' PYTHONHASHSEED or use keyMode: derived",
                "tokenProcessorConfig.hashSeed",
            )
        self.block_size = block_size
        self.hash_algorithm = hash_algorithm
        self._hash = fn
        self.none_hash: bytes = fn(hash_seed if hash_seed else DEFAULT_NONE_HASH_SEED)
        self._lora = dict(lora_adapters or {})

    def extra_keys(
        self, block_index: int, lora_name: str | None, cache_salt: str | None
    ) -> tuple[Any, ...] | None:
        """vLLM's extra keys of one block (LoRA on all blocks, salt on block 0): tagged tuples
        from 0.31, the bare name and salt before."""
        if not self._tagged:
            bare: list[Any] = [lora_name] if lora_name else []
            if cache_salt and block_index == 0:
                bare.append(cache_salt)
            return tuple(bare) if bare else None
        keys: list[tuple[Any, ...]] = []
        if lora_name:
            path = self._lora.get(lora_name)
            if path is None:
                raise KeyDerivationError(
                    f"LoRA {lora_name!r} has no path in tokenProcessorConfig.loraAdapters; "
                    "vLLM hashes the adapter path, so its keys cannot be reproduced"
                )
            keys.append(("lora", lora_name, path))
        if cache_salt and block_index == 0:
            keys.append(("cache_salt", cache_salt))
        return tuple(keys) if keys else None

    def digests(
        self,
        token_ids: Sequence[int],
        lora_name: str | None = None,
        cache_salt: str | None = None,
        parent: bytes | None = None,
        first_block_index: int = 0,
    ) -> list[bytes]:
        """Full vLLM digests of every full block, chained from `parent` (NONE_HASH if None)."""
        bs = self.block_size
        n = len(token_ids) // bs
        out: list[bytes] = []
        prev = parent if parent is not None else self.none_hash
        ids = list(token_ids)
        for i in range(n):
            extra = self.extra_keys(first_block_index + i, lora_name, cache_salt)
            prev = self._hash((prev, tuple(ids[i * bs : (i + 1) * bs]), extra))
            out.append(prev)
        return out

    def root(self, model: str, lora_name: str | None = None, cache_salt: str | None = None) -> int:
        return u64(self.none_hash)

    def block_keys(
        self,
        token_ids: Sequence[int],
        model: str,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> list[int]:
        return [u64(d) for d in self.digests(token_ids, lora_name, cache_salt)]


def make_keyer(
    key_mode: str = "derived",
    block_size: int = 16,
    hash_seed: str = "",
    hash_algorithm: str = "sha256",
    lora_adapters: Mapping[str, str] | None = None,
    vllm_hash_generation: str = DEFAULT_VLLM_HASH_GENERATION,
) -> DerivedKeyer | VllmKeyer:
    """Build the keyer for a `TokenProcessorConfig`'s fields.

    Raises:
        ConfigError: Unknown key mode or algorithm.
    """
    if key_mode == "derived":
        return DerivedKeyer(block_size, hash_seed)
    if key_mode == "vllm":
        return VllmKeyer(
            block_size, hash_algorithm, hash_seed or None, lora_adapters, vllm_hash_generation
        )
    raise ConfigError(
        f"unknown key mode {key_mode!r}; valid: ['derived', 'vllm']", "tokenProcessorConfig.keyMode"
    )
