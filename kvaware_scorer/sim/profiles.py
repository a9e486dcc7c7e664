"""Engine profiles: model and GPU numbers, KV capacity, and the roofline step-time model.

A profile says what one emulated vLLM pod is: which model (from its ``config.json``), on which
GPUs (from the vendor datasheet), with which vLLM settings (block size, token budget, sequence
limit, memory utilization). From it follow the pod's KV capacity in blocks and the duration of
each engine step. Every number and where it comes from is listed in ``docs/emulator.md``.

The step time is a roofline: ``overhead + max(compute, memory) / tp_efficiency`` where compute
is the batch's FLOPs (linear layers for every scheduled token, attention against each token's
context, the LM head for every sampled token) over the GPUs' dense bf16 peak times an achievable
fraction, and memory is the bytes moved (weights once per step, each sequence's cached KV read
once, the new tokens' KV written) over HBM bandwidth times an achievable fraction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from kvaware_scorer.errors import ConfigError

__all__ = [
    "GIB",
    "PROFILES",
    "EngineProfile",
    "GpuSpec",
    "ModelSpec",
    "StepCost",
    "get_profile",
]

GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A decoder-only transformer's shape, as in its Hugging Face ``config.json``.

    Attributes:
        name: Served model name (the Hugging Face id).
        num_layers: ``num_hidden_layers``.
        hidden_size: ``hidden_size``.
        intermediate_size: ``intermediate_size`` (gated MLP: 3 matrices).
        num_attention_heads: ``num_attention_heads``.
        num_kv_heads: ``num_key_value_heads``.
        head_dim: ``head_dim``.
        vocab_size: ``vocab_size``.
        max_model_len: ``max_position_embeddings`` (vLLM's default ``max_model_len``).
        tie_word_embeddings: Whether the LM head shares the embedding matrix.
        bytes_per_param: 2 for bf16 weights.
        kv_bytes_per_elem: 2 for a bf16 KV cache.
    """

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    tie_word_embeddings: bool = False
    bytes_per_param: float = 2.0
    kv_bytes_per_elem: float = 2.0

    @property
    def layer_params(self) -> int:
        """Parameters of one layer: q/k/v/o projections and the gated MLP (norms neglected)."""
        h, d = self.hidden_size, self.head_dim
        q = h * self.num_attention_heads * d
        kv = 2 * h * self.num_kv_heads * d
        o = self.num_attention_heads * d * h
        mlp = 3 * h * self.intermediate_size
        return q + kv + o + mlp

    @property
    def embedding_params(self) -> int:
        """Parameters of the token embedding (one matrix)."""
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """All parameters: layers, embedding and (when untied) the LM head."""
        lm_head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.num_layers * self.layer_params + self.embedding_params + lm_head

    @property
    def weight_bytes(self) -> float:
        """Bytes of all weights."""
        return self.num_params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes of one token over all layers: K and V, per KV head, per head dim."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_bytes_per_elem


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One accelerator's datasheet figures.

    Attributes:
        name: Marketing name.
        memory_bytes: HBM capacity.
        peak_flops: Dense bf16 tensor-core FLOP/s (without sparsity).
        hbm_bandwidth: HBM bytes/s.
    """

    name: str
    memory_bytes: float
    peak_flops: float
    hbm_bandwidth: float


@dataclass(slots=True)
class StepCost:
    """What one engine step computes, accumulated while the step is scheduled.

    Attributes:
        tokens: Scheduled tokens (prefill chunks plus one per decoding sequence).
        attention_pairs: Sum over scheduled tokens of the positions each attends to.
        context_read_tokens: Tokens of cached KV read (each sequence's context, once).
        sampled: Sequences that sample a token in this step (LM head rows).
        sequences: Scheduled sequences.
    """

    tokens: int = 0
    attention_pairs: float = 0.0
    context_read_tokens: int = 0
    sampled: int = 0
    sequences: int = 0

    def add(self, computed: int, new: int, samples: bool) -> None:
        """Account a sequence with `computed` cached tokens scheduling `new` tokens."""
        self.tokens += new
        self.attention_pairs += new * computed + new * (new + 1) / 2
        self.context_read_tokens += computed
        self.sequences += 1
        if samples:
            self.sampled += 1


@dataclass(frozen=True, slots=True)
class EngineProfile:
    """One emulated vLLM pod: model, GPUs, vLLM settings and the roofline's efficiency factors.

    Attributes:
        name: Profile name (``qwen3-32b-2xh100``).
        model: The model.
        gpu: One GPU of the pod.
        tensor_parallel_size: GPUs per pod (weights and KV heads split across them).
        gpu_memory_utilization: vLLM's ``--gpu-memory-utilization`` (default 0.9).
        activation_reserve_bytes: Per GPU: memory vLLM's profiling run keeps for activations,
            CUDA graphs and non-torch allocations (not available to the KV cache).
        block_size: vLLM ``--block-size`` (tokens per KV block).
        max_num_batched_tokens: vLLM's per-step token budget (chunked prefill).
        max_num_seqs: vLLM's limit on running sequences.
        max_model_len: vLLM ``--max-model-len``; None = the model's.
        compute_efficiency: Achievable fraction of peak FLOP/s for the step's GEMMs.
        bandwidth_efficiency: Achievable fraction of HBM bandwidth.
        tp_efficiency: Fraction of ideal speed-up kept under tensor parallelism (all-reduce).
        step_overhead_s: Fixed per-step cost (scheduling, sampling, launch, detokenization).
    """

    name: str
    model: ModelSpec
    gpu: GpuSpec
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    activation_reserve_bytes: float = 4 * GIB
    block_size: int = 16
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 1024
    max_model_len: int | None = None
    compute_efficiency: float = 0.55
    bandwidth_efficiency: float = 0.8
    tp_efficiency: float = 1.0
    step_overhead_s: float = 0.002

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ConfigError("must be >= 1", "profile.blockSize")
        if self.tensor_parallel_size < 1:
            raise ConfigError("must be >= 1", "profile.tensorParallelSize")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ConfigError("token budget and sequence limit must be >= 1", "profile")
        if self.num_gpu_blocks < 2:
            raise ConfigError(
                f"profile {self.name!r} leaves no memory for the KV cache "
                f"({self.kv_cache_bytes_per_gpu / GIB:.2f} GiB per GPU)",
                "profile",
            )

    def with_overrides(self, **changes: Any) -> EngineProfile:
        """A copy with some fields changed (``None`` values are ignored)."""
        kept = {k: v for k, v in changes.items() if v is not None}
        return replace(self, **kept) if kept else self

    # -- capacity -------------------------------------------------------------------------------

    @property
    def kv_cache_bytes_per_gpu(self) -> float:
        """Per GPU: utilization x memory - this GPU's share of the weights - the reserve."""
        budget = self.gpu.memory_bytes * self.gpu_memory_utilization
        weights = self.model.weight_bytes / self.tensor_parallel_size
        return budget - weights - self.activation_reserve_bytes

    @property
    def kv_bytes_per_token_per_gpu(self) -> float:
        """KV bytes one token takes on one GPU (KV heads are split across the TP group)."""
        return self.model.kv_bytes_per_token / self.tensor_parallel_size

    @property
    def num_gpu_blocks(self) -> int:
        """Blocks in the pod's pool (vLLM's ``num_gpu_blocks``, incl. the reserved null block)."""
        per_block = self.kv_bytes_per_token_per_gpu * self.block_size
        return max(0, int(self.kv_cache_bytes_per_gpu // per_block))

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the KV cache holds (what vLLM logs as "GPU KV cache size")."""
        return self.num_gpu_blocks * self.block_size

    @property
    def effective_max_model_len(self) -> int:
        """``max_model_len``: the configured or model value, never beyond the KV capacity."""
        configured = self.max_model_len or self.model.max_model_len
        return min(configured, (self.num_gpu_blocks - 1) * self.block_size)

    # -- time -----------------------------------------------------------------------------------

    def step_time(self, cost: StepCost) -> float:
        """Seconds one engine step takes for the scheduled work in `cost`."""
        m = self.model
        flops = (
            2.0 * m.num_layers * m.layer_params * cost.tokens
            + 4.0 * m.num_layers * m.num_attention_heads * m.head_dim * cost.attention_pairs
            + 2.0 * m.embedding_params * cost.sampled
        )
        lm_head_bytes = 0 if m.tie_word_embeddings else m.embedding_params * m.bytes_per_param
        weights_read = m.num_layers * m.layer_params * m.bytes_per_param + lm_head_bytes
        kv_moved = m.kv_bytes_per_token * (cost.context_read_tokens + cost.tokens)
        tp = self.tensor_parallel_size
        t_compute = flops / (tp * self.gpu.peak_flops * self.compute_efficiency)
        t_memory = (weights_read + kv_moved) / (
            tp * self.gpu.hbm_bandwidth * self.bandwidth_efficiency
        )
        return self.step_overhead_s + max(t_compute, t_memory) / self.tp_efficiency

    def decode_step_time(self, batch: int, context: int) -> float:
        """Step time of `batch` sequences each decoding one token after `context` tokens."""
        cost = StepCost()
        for _ in range(batch):
            cost.add(context, 1, True)
        return self.step_time(cost)

    def prefill_throughput(self, chunk: int | None = None) -> float:
        """Tokens/s of back-to-back prefill steps of `chunk` new tokens (no cached context)."""
        n = chunk or self.max_num_batched_tokens
        cost = StepCost()
        cost.add(0, n, True)
        return n / self.step_time(cost)

    def describe(self) -> dict[str, Any]:
        """The profile's derived figures, for reports."""
        return {
            "name": self.name,
            "model": self.model.name,
            "gpu": self.gpu.name,
            "tensor_parallel_size": self.tensor_parallel_size,
            "num_params": self.model.num_params,
            "kv_bytes_per_token": self.model.kv_bytes_per_token,
            "block_size": self.block_size,
            "num_gpu_blocks": self.num_gpu_blocks,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "max_model_len": self.effective_max_model_len,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_num_seqs": self.max_num_seqs,
            "decode_step_s_batch1_ctx1k": self.decode_step_time(1, 1024),
            "prefill_tokens_per_s": self.prefill_throughput(),
        }


# NVIDIA H100 SXM5 80GB datasheet: 80 GB HBM3 (5 stacks x 16 GiB), 3.35 TB/s, BF16 tensor core
# 1,979 TFLOPS "with sparsity" = 989.4 TFLOPS dense.
H100_SXM = GpuSpec("NVIDIA H100 SXM5 80GB", 80 * GIB, 989.4e12, 3.35e12)

# Qwen/Qwen3-32B config.json.
QWEN3_32B = ModelSpec(
    name="Qwen/Qwen3-32B",
    num_layers=64,
    hidden_size=5120,
    intermediate_size=25600,
    num_attention_heads=64,
    num_kv_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_model_len=40960,
    tie_word_embeddings=False,
)

# meta-llama/Llama-3.1-8B-Instruct config.json.
LLAMA31_8B = ModelSpec(
    name="meta-llama/Llama-3.1-8B-Instruct",
    num_layers=32,
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_kv_heads=8,
    head_dim=128,
    vocab_size=128256,
    max_model_len=131072,
    tie_word_embeddings=False,
)

PROFILES: dict[str, EngineProfile] = {
    # The upstream 73-capacity setup: 8 pods of Qwen3-32B, TP=2 on H100 SXM, vLLM block size 64
    # (the precise scorer there hashed 64-token blocks, which had to equal vLLM's).
    "qwen3-32b-2xh100": EngineProfile(
        name="qwen3-32b-2xh100",
        model=QWEN3_32B,
        gpu=H100_SXM,
        tensor_parallel_size=2,
        block_size=64,
        tp_efficiency=0.9,
    ),
    "llama-3.1-8b-1xh100": EngineProfile(
        name="llama-3.1-8b-1xh100",
        model=LLAMA31_8B,
        gpu=H100_SXM,
        tensor_parallel_size=1,
        block_size=16,
    ),
}


def get_profile(name: str) -> EngineProfile:
    """The built-in profile `name`.

    Raises:
        ConfigError: Unknown name (the message lists the valid ones).
    """
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(
            f"unknown profile {name!r}; valid: {sorted(PROFILES)}", "profile"
        ) from None
