"""Profiles: model sizes from config.json, KV capacity math and the roofline step time."""

from __future__ import annotations

import pytest

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.sim.profiles import GIB, PROFILES, StepCost, get_profile


def test_qwen3_32b_sizes_follow_its_config() -> None:
    """Qwen3-32B: 32.76B parameters and 256 KiB of bf16 KV per token (64 layers x 8 x 128 x 2 x 2)."""
    m = get_profile("qwen3-32b-2xh100").model
    assert m.kv_bytes_per_token == 2 * 64 * 8 * 128 * 2 == 262144
    assert 32.7e9 < m.num_params < 32.8e9  # model card: 32.8B
    assert get_profile("llama-3.1-8b-1xh100").model.num_params == pytest.approx(8.03e9, rel=0.01)


def test_kv_capacity_math() -> None:
    """Blocks = (mem x util - weights/TP - reserve) / (KV bytes per token / TP x block size)."""
    p = get_profile("qwen3-32b-2xh100")
    per_gpu = 80 * GIB * 0.9 - p.model.weight_bytes / 2 - p.activation_reserve_bytes
    assert p.num_gpu_blocks == int(per_gpu // (262144 / 2 * 64))
    # within 0.2% of the 307,328 tokens vLLM reported for this setup upstream
    assert abs(p.kv_capacity_tokens - 307_328) / 307_328 < 0.002
    more_util = p.with_overrides(gpu_memory_utilization=0.95)
    assert more_util.num_gpu_blocks > p.num_gpu_blocks
    assert p.effective_max_model_len == 40960


def test_profile_without_kv_memory_is_refused() -> None:
    """A profile whose weights leave no room for a KV cache is a ConfigError."""
    p = get_profile("qwen3-32b-2xh100")
    with pytest.raises(ConfigError):
        p.with_overrides(tensor_parallel_size=1, gpu_memory_utilization=0.7)


def test_step_time_is_memory_bound_for_decode_and_compute_bound_for_prefill() -> None:
    """Decode steps grow with context read; prefill steps grow ~linearly with tokens."""
    for p in PROFILES.values():
        d1 = p.decode_step_time(1, 1000)
        d64 = p.decode_step_time(64, 8000)
        assert p.step_overhead_s < d1 < d64
        small, big = StepCost(), StepCost()
        small.add(0, 2048, True)
        big.add(0, 8192, True)
        t_small, t_big = p.step_time(small), p.step_time(big)
        assert 3.0 < (t_big - p.step_overhead_s) / (t_small - p.step_overhead_s) < 5.0
        # cached context makes a chunk's attention costlier, never cheaper
        ctx = StepCost()
        ctx.add(16000, 2048, True)
        assert p.step_time(ctx) > t_small


def test_calibration_is_in_the_range_of_published_figures() -> None:
    """Qwen3-32B TP2 decodes a typical batch in 20-40 ms (upstream ITL mean ~25 ms)."""
    p = get_profile("qwen3-32b-2xh100")
    assert 0.020 < p.decode_step_time(24, 7500) < 0.040
    assert 8000 < p.prefill_throughput() < 25000


def test_unknown_profile_lists_valid_ones() -> None:
    """An unknown profile name raises ConfigError naming the valid profiles."""
    with pytest.raises(ConfigError, match="qwen3-32b-2xh100"):
        get_profile("nope")
