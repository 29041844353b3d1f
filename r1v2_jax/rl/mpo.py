"""Mixed Preference Optimization: ``w_p·DPO + w_q·BCO + w_g·NLL`` on sequence log-probs.

With Δ(y) = β (log πθ(y|x) − log π_ref(y|x)):

* preference (DPO):  −log σ(Δ(y_c) − Δ(y_r))
* quality (BCO):     −log σ(Δ(y_c) − δ) − log σ(−(Δ(y_r) − δ)), δ a moving average of past Δ
* generation (NLL):  −log πθ(y_c|x) / |y_c|

δ lives in the train state: the loss reads it (no gradient) and :func:`bco_delta_update`
returns its next value from this batch's Δ, inside the same jitted step. With
``w_quality = w_gen = 0`` this is plain DPO.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from r1v2_jax.rl.losses import LossSum


@dataclasses.dataclass(frozen=True)
class MPOConfig:
    beta: float = 0.1
    w_pref: float = 0.8
    w_quality: float = 0.2
    w_gen: float = 1.0
    delta_decay: float = 0.99  # EMA decay of the BCO shift δ

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta: must be > 0, got {self.beta}")
        if min(self.w_pref, self.w_quality, self.w_gen) < 0:
            raise ValueError("MPO weights must be >= 0")
        if not 0 <= self.delta_decay < 1:
            raise ValueError(f"delta_decay: must be in [0, 1), got {self.delta_decay}")


def implicit_rewards(policy_logp: jax.Array, ref_logp: jax.Array, cfg: MPOConfig) -> jax.Array:
    """Δ(y) = β (log πθ(y|x) − log π_ref(y|x)) per sequence."""
    return cfg.beta * (policy_logp - ref_logp)


def mpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array,
             chosen_tokens: jax.Array, delta: jax.Array, cfg: MPOConfig) -> tuple[LossSum, dict[str, jax.Array]]:
    """MPO over a batch of B pairs.

    policy_*/ref_*: f32[B] sequence log-probs (sums over the response tokens) of the chosen
    and rejected responses; chosen_tokens: [B] token counts of the chosen responses; delta:
    f32[] the BCO shift. Returns (LossSum with count B, metrics incl. the batch's rewards).
    """
    r_c = implicit_rewards(policy_chosen, ref_chosen, cfg)
    r_r = implicit_rewards(policy_rejected, ref_rejected, cfg)
    d = jax.lax.stop_gradient(delta)
    pref = -jax.nn.log_sigmoid(r_c - r_r)
    quality = -jax.nn.log_sigmoid(r_c - d) - jax.nn.log_sigmoid(-(r_r - d))
    gen = -policy_chosen / jnp.maximum(chosen_tokens.astype(jnp.float32), 1.0)
    per_pair = cfg.w_pref * pref + cfg.w_quality * quality + cfg.w_gen * gen
    b = per_pair.shape[0]
    metrics = dict(
        pref_loss=pref.mean(), quality_loss=quality.mean(), gen_loss=gen.mean(),
        reward_chosen=r_c.mean(), reward_rejected=r_r.mean(), reward_margin=(r_c - r_r).mean(),
        reward_accuracy=(r_c > r_r).astype(jnp.float32).mean(), bco_delta=d,
    )
    return LossSum(per_pair.sum(), jnp.asarray(b, jnp.float32)), metrics


def bco_delta_update(delta: jax.Array, reward_chosen: jax.Array, reward_rejected: jax.Array,
                     cfg: MPOConfig) -> jax.Array:
    """δ ← decay·δ + (1 − decay)·mean(Δ over this batch's chosen and rejected responses)."""
    batch_mean = jax.lax.stop_gradient(jnp.concatenate([reward_chosen, reward_rejected]).mean())
    return cfg.delta_decay * delta + (1.0 - cfg.delta_decay) * batch_mean


def dpo_config(beta: float = 0.1) -> MPOConfig:
    """MPO reduced to plain DPO."""
    return MPOConfig(beta=beta, w_pref=1.0, w_quality=0.0, w_gen=0.0)
