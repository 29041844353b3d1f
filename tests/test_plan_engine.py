"""The paged engine's planned rollout (r1v2_jax.plan.engine), checked against hand-computed figures."""

import dataclasses
import math

import numpy as np
import pytest

from r1v2_jax.model.config import model_config
from r1v2_jax.plan.engine import completion_lengths, decode_seconds, kv_bytes_per_token, pool_bytes


def test_completion_lengths_are_the_distributions_quantiles():
    # exponential, mean 50: -50 ln(1 - q) at q = 1/8, 3/8, 5/8, 7/8 = 6.68, 23.5, 49.04, 103.97
    assert completion_lengths("exponential", 0.5, 100, 4).tolist() == [7, 24, 50, 100]
    assert completion_lengths("uniform", 0.5, 100, 4).tolist() == [13, 38, 63, 88]
    assert completion_lengths("max", 0.5, 100, 4).tolist() == [100] * 4
    big = completion_lengths("exponential", 0.5, 8192, 4096)
    assert (big >= 8192).mean() == pytest.approx(math.exp(-2), abs=1e-3)  # the share truncated at the cap
    with pytest.raises(ValueError, match="completion_dist"):
        completion_lengths("gamma", 0.5, 100, 4)


@dataclasses.dataclass(frozen=True)
class _Topo:
    hbm_bandwidth: float = 1.0
    peak_flops: float = 1e30  # memory-bound: the seconds are the bytes read
    topology_name: str = "v5p:2x2x1"
    ici_bandwidth: float = 600e9


def test_decode_seconds_by_hand():
    mc = model_config("tiny")
    kv = kv_bytes_per_token(mc, 1, 4)
    t = mc.text
    assert kv == t.num_layers * 2 * t.num_kv_heads * t.resolved_head_dim * 4
    # heads replicated past the K/V head count: a chip holds at least one
    assert kv_bytes_per_token(mc, 4 * t.num_kv_heads, 4) == t.num_layers * 2 * t.resolved_head_dim * 4
    w = 1000
    common = dict(data=1, tensor=1, prompt_len=3, weight_bytes=w, kv_dtype_bytes=4, topo=_Topo())
    common.update(bandwidth_util=1.0, collective_latency_s=0.0)
    lengths = np.array([2, 1])
    # step 0: both rows live at 3 valid positions; step 1: one row at 4
    r = decode_seconds(mc, lengths=lengths, mode="ragged", **common)
    assert r["steps"] == 2 and r["seconds"] == pytest.approx(2 * w + (2 * 3 + 4) * kv)
    assert r["kv_seconds"] == pytest.approx(10 * kv) and r["weight_seconds"] == pytest.approx(2 * w)
    # every slot its whole cache (3 + 2 positions), every step
    assert decode_seconds(mc, lengths=lengths, mode="dense", **common)["seconds"] == pytest.approx(2 * w + 20 * kv)
    # every slot the power-of-two bucket of the longest live row: 4 and 4 positions
    assert decode_seconds(mc, lengths=lengths, mode="bucket", **common)["seconds"] == pytest.approx(2 * w + 16 * kv)
    # two data groups: each holds one row (every other length, longest first)
    two = decode_seconds(mc, lengths=lengths, mode="ragged", **{**common, "data": 2})
    assert two["slots"] == 1 and two["seconds"] == pytest.approx(2 * w + (3 + 4) * kv)
    # tensor parallelism: two all-reduces per layer of slots x hidden bf16, ring 2 (t-1)/t, plus latency
    tp = decode_seconds(mc, lengths=lengths, mode="ragged", **{**common, "tensor": 2, "collective_latency_s": 1e-3})
    ar = 2 * (2 - 1) / 2 * 2 * t.hidden_size * 2 / 600e9 + 1e-3
    assert tp["comm_seconds"] == pytest.approx(2 * 2 * t.num_layers * ar)


def test_page_pool_by_hand():
    mc = model_config("tiny")
    # 1 prompt of 5 tokens (2 pages of 4), 2 slots of up to 7 new tokens (2 pages + a copy-on-write
    # page each), and the reserved page 0: 9 pages of 4 tokens
    assert pool_bytes(
        mc, prompts=1, slots=2, prompt_len=5, max_new=7, page=4, tensor=1, dtype_bytes=2
    ) == 9 * 4 * kv_bytes_per_token(mc, 1, 2)
