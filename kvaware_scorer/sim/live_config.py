"""Settings of live emulated pods and the text they generate.

`LivePodsConfig` is the ``livePods`` configuration of ``kvaware sim serve`` (pods, ports, engine
profile, KV-event publishing); `OutputText` chooses each request's output tokens
deterministically from its prompt and renders them as text.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import xxhash
from pydantic import Field, field_validator

from kvaware_scorer.config import (
    ConfigModel,
)
from kvaware_scorer.errors import ConfigError
from kvaware_scorer.sim.profiles import PROFILES, EngineProfile, get_profile

if TYPE_CHECKING:
    pass

__all__ = ["LivePodsConfig", "OutputText"]


class LivePodsConfig(ConfigModel):
    """Live emulated pods (``kvaware sim serve``).

    Attributes:
        profile: Engine profile (model, GPU, vLLM settings), see ``docs/emulator.md``.
        model: Served model name (default: the profile's model).
        num_pods: Pods started.
        speedup: Emulated seconds per wall second (10 = ten times faster than the GPU).
        host: Address every pod listens on (HTTP, publisher and replay sockets).
        base_port: HTTP port of pod 0 (pod i: ``base_port + i``); 0 = free ports.
        num_gpu_blocks: KV blocks per pod instead of the profile's (a small KV capacity makes
            routing quality visible with little load).
        block_size: vLLM ``--block-size`` override.
        max_num_batched_tokens: vLLM ``--max-num-batched-tokens`` override.
        max_num_seqs: vLLM ``--max-num-seqs`` override.
        max_model_len: vLLM ``--max-model-len`` override.
        engine_hash: Block hash of the engines: vLLM's default ``sha256`` (events carry the
            hashes a real vLLM would send) or the emulator's faster ``xxh3``.
        hash_seed: The pods' PYTHONHASHSEED (empty = unset, as vLLM's default).
        tokenizer: Tokenizer directory (or ``tokenizer.json``) for text prompts, chat rendering
            and output text; None = token-id prompts only.
        kv_events: Publish KV events.
        kv_events_connect: Connect every pod's PUB socket to this endpoint (a router bound
            there, e.g. ``tcp://127.0.0.1:5557``) instead of binding one per pod.
        kv_events_base_port: Publisher port of pod 0 (pod i: ``+2i``, its replay ROUTER
            ``+2i+1``); 0 = free ports.
        kv_topic: Topic template (``{pod}`` = ``<address>:<port>``, ``{model}``); ``""`` sends
            vLLM's default empty topic.
        replay: Bind a replay ROUTER per pod (vLLM's ``replay_endpoint``).
        buffer_steps: Batches kept for replay (vLLM's ``buffer_steps``).
        default_max_tokens: Tokens generated when a request gives no ``max_tokens`` (vLLM: 16
            for completions; for chat it generates up to the context limit, which an emulator
            that ignores EOS should not do).
        prompt_tokens_details: Report ``usage.prompt_tokens_details.cached_tokens`` (vLLM's
            ``--enable-prompt-tokens-details``).
        event_format: Wire format of the published KV events: ``vllm``, or ``sglang`` (an
            SGLang >= 0.5.20 publisher's payloads, for the engine seam's live tests).
    """

    profile: str = "llama-3.1-8b-1xh100"
    model: str | None = None
    num_pods: int = Field(3, ge=1, le=256)
    speedup: float = Field(1.0, gt=0, le=10_000)
    host: str = "127.0.0.1"
    base_port: int = Field(0, ge=0, le=65535)
    num_gpu_blocks: int | None = Field(None, ge=2)
    block_size: int | None = Field(None, ge=1, le=4096)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    max_num_seqs: int | None = Field(None, ge=1)
    max_model_len: int | None = Field(None, ge=2)
    engine_hash: Literal["sha256", "xxh3"] = "sha256"
    hash_seed: str = ""
    tokenizer: str | None = None
    kv_events: bool = True
    kv_events_connect: str | None = None
    kv_events_base_port: int = Field(0, ge=0, le=65535)
    kv_topic: str = "kv@{pod}@{model}"
    replay: bool = True
    buffer_steps: int = Field(10_000, ge=1)
    default_max_tokens: int = Field(16, ge=1)
    prompt_tokens_details: bool = True
    event_format: Literal["vllm", "sglang"] = "vllm"

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        if value not in PROFILES:
            raise ValueError(f"unknown profile {value!r}; valid: {sorted(PROFILES)}")
        return value

    @field_validator("kv_topic")
    @classmethod
    def _topic_template(cls, value: str) -> str:
        try:
            value.format(pod="p", model="m")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"bad topic template (use {{pod}} and {{model}}): {exc}") from None
        return value

    def engine_profile(self) -> EngineProfile:
        """The profile with this config's overrides."""
        return get_profile(self.profile).with_overrides(
            block_size=self.block_size,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            max_model_len=self.max_model_len,
        )

    @property
    def model_name(self) -> str:
        """The served model name."""
        return self.model or get_profile(self.profile).model.name


class OutputText:
    """Deterministic output tokens and their text.

    Generated tokens are drawn, with a seed taken from the prompt's token ids (the same prompt
    gets the same answer on every pod, as greedy decoding would), from the tokenizer's
    ordinary word tokens (a space and letters, which decode on their own), so the text of a
    stream is the concatenation of its chunks. Without a tokenizer, ids from a fixed range are
    used and read ``" t<id>"``.

    Args:
        tokenizer: Tokenizer directory or ``tokenizer.json`` path; None = synthetic tokens.

    Raises:
        ConfigError: The tokenizer cannot be loaded or has no usable tokens.
    """

    def __init__(self, tokenizer: str | Path | None = None) -> None:
        self._pieces: dict[int, str] = {}
        self._tokenizer: Any = None
        if tokenizer is None:
            ids = np.arange(1000, 1000 + 4096, dtype=np.int32)
            self.vocab_size: int | None = None
            self._synthetic = True
        else:
            ids = self._load(Path(tokenizer))
            self._synthetic = False
        self.candidates = ids

    def _load(self, path: Path) -> np.ndarray:
        from tokenizers import Tokenizer

        file = path if path.is_file() else path / "tokenizer.json"
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as exc:
            raise ConfigError(f"cannot load tokenizer: {exc}", str(file)) from None
        self._tokenizer = tok
        special = set(tok.get_added_tokens_decoder())
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        words: list[int] = []
        others: list[int] = []
        for i in range(tok.get_vocab_size(with_added_tokens=False)):
            if i in special:
                continue
            text = tok.decode([i], skip_special_tokens=True)
            if not text or "\ufffd" in text or not text.isprintable():
                continue
            if len(text) > 2 and text[0] == " " and text[1:].isascii() and text[1:].isalpha():
                words.append(i)
            else:
                others.append(i)
            self._pieces[i] = text
        chosen = words if len(words) >= 16 else words + others
        if not chosen:
            raise ConfigError("the tokenizer has no token usable as output", str(file))
        return np.asarray(chosen, dtype=np.int32)

    def tokens(self, prompt: np.ndarray, n: int) -> np.ndarray:
        """`n` output token ids for `prompt` (deterministic)."""
        seed = xxhash.xxh64_intdigest(np.ascontiguousarray(prompt, dtype="<i4").tobytes())
        rng = np.random.default_rng(seed)
        picked: np.ndarray = self.candidates[rng.integers(0, len(self.candidates), n)]
        return picked

    def text(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of output tokens `ids` (the concatenation of their pieces)."""
        if self._synthetic:
            return "".join(f" t{int(i)}" for i in ids)
        pieces = self._pieces
        return "".join(pieces.get(int(i), "") for i in ids)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of any token ids, special tokens included (vLLM's ``/detokenize``)."""
        if self._tokenizer is None:
            return self.text(ids)
        text: str = self._tokenizer.decode(list(ids), skip_special_tokens=False)
        return text

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        """Each id's vocabulary entry (``convert_ids_to_tokens``), for ``return_token_strs``."""
        if self._tokenizer is None:
            return [f"t{int(i)}" for i in ids]
        tok = self._tokenizer
        return [tok.id_to_token(int(i)) or "" for i in ids]
