"""Group-relative advantages (GRPO and its variants) and DAPO's dynamic-sampling filter.

Rewards come flat, ``f32[num_groups * G]``, the G samples of a prompt contiguous (the layout
the sampler returns).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ADVANTAGE_MODES = ("grpo", "drgrpo", "rloo")


def group_advantages(
    rewards: jax.Array, group_size: int, *, mode: str = "grpo", std_ddof: int = 1, eps: float = 1e-6
) -> jax.Array:
    """Advantages within each group of ``group_size`` samples.

    * ``grpo``:   (r − mean) / (std + eps), std with ``std_ddof`` (1 = unbiased, as peers use);
    * ``drgrpo``: r − mean (Dr. GRPO: no std normalisation);
    * ``rloo``:   r − mean of the *other* G−1 samples = G/(G−1) · (r − mean).

    rewards: f32[N], N a multiple of group_size -> f32[N]. A group whose rewards are all
    equal gets exactly zero advantage in every mode.
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"advantage mode: expected one of {ADVANTAGE_MODES}, got {mode!r}")
    n = rewards.shape[0]
    if n % group_size:
        raise ValueError(f"rewards: {n} samples are not a multiple of group_size={group_size}")
    if mode == "rloo" and group_size < 2:
        raise ValueError("rloo needs group_size >= 2")
    if mode == "grpo" and group_size - std_ddof < 1:
        raise ValueError(f"std_ddof={std_ddof} needs group_size > {std_ddof}")
    r = rewards.astype(jnp.float32).reshape(-1, group_size)
    centred = r - r.mean(axis=1, keepdims=True)
    if mode == "grpo":
        std = jnp.sqrt(jnp.sum(centred**2, axis=1, keepdims=True) / (group_size - std_ddof))
        adv = centred / (std + eps)
    elif mode == "drgrpo":
        adv = centred
    else:
        adv = centred * (group_size / (group_size - 1))
    # All-equal groups: exactly zero (the float mean of equal values can differ from them by
    # an ulp, which std normalisation would blow up to O(1)).
    flat = r.max(axis=1, keepdims=True) == r.min(axis=1, keepdims=True)
    return jnp.where(flat, 0.0, adv).reshape(n)


def nonzero_variance_groups(rewards: jax.Array, group_size: int, tol: float = 0.0) -> jax.Array:
    """DAPO's dynamic-sampling filter: bool[N], True for samples of groups whose rewards are
    not all equal (max − min > tol)."""
    r = rewards.reshape(-1, group_size)
    keep = (r.max(axis=1) - r.min(axis=1)) > tol
    return jnp.repeat(keep, group_size)


def select_first(mask: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Indices of the first ``k`` True entries of ``mask`` (static k) and which of them exist.

    For dynamic sampling: oversample groups, then fill a static batch with the kept ones.
    Returns (indices i32[k], valid bool[k]); invalid slots point at index 0.
    """
    order = jnp.argsort(~mask, stable=True)[:k]
    valid = jnp.take(mask, order)
    return jnp.where(valid, order, 0).astype(jnp.int32), valid


def effective_share(advantages: jax.Array, threshold: float = 0.0, valid: jax.Array | None = None) -> jax.Array:
    """Share of samples with |Â| > threshold (the paper's "effective samples")."""
    eff = (jnp.abs(advantages) > threshold).astype(jnp.float32)
    if valid is None:
        return eff.mean()
    v = valid.astype(jnp.float32)
    return (eff * v).sum() / jnp.maximum(v.sum(), 1.0)
