"""Mixed Preference Optimization: ``w_p·DPO + w_q·BCO + w_g·NLL`` on sequence log-probs.

With Δ(y) = β (log πθ(y|x) − log π_ref(y|x)):

* preference (DPO):  −log σ(Δ(y_c) − Δ(y_r))
* quality (BCO):     −log σ(Δ(y_c) − δ) − log σ(−(Δ(y_r) − δ)), δ a mean of past and present Δ
* generation (NLL):  −log πθ(y_c|x), normalised per token (``gen_norm``)

This is InternVL's MPO trainer (TRL's DPOTrainer with loss types ``sigmoid`` + ``bco_pair``
and weights 0.8 / 0.2, plus its SFT term, weight 1.0). Two details follow it exactly:

* δ (``delta_mode="running_mean"``): TRL's ``bco_pair`` keeps a ``RunningMoments`` of each
  batch's mean reward (chosen and rejected together), *updated with the current batch before
  the loss*: δ_t = (1/t) Σ_{s≤t} mean(Δ of batch s), exact from the first batch (no bias
  towards 0). ``delta_mode="ema"`` is a bias-corrected EMA instead (δ_t = m_t / (1 − decay^t),
  m_t = decay·m_{t−1} + (1 − decay)·x_t), also updated before the loss. One update per train
  step over the whole (global) batch, so δ does not depend on the micro-batch split; TRL
  updates once per forward pass (micro-batch) with the mean over processes.
* the NLL (``gen_norm="batch-token-mean"``): one token mean over all chosen tokens of the
  batch, Σ_i −log π(y_c,i) / Σ_i |y_c,i| (TRL/InternVL's ``CrossEntropyLoss`` over the flattened
  chosen labels). ``"seq-mean"`` is the mean over pairs of each pair's token mean.

δ lives in the train state as (``bco_delta``, ``bco_count``): the step computes this batch's
rewards first, :func:`bco_delta_update` gives the new δ, and the loss reads it (no gradient).
With ``w_quality = w_gen = 0`` this is plain DPO.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from r1v2_jax.rl.losses import LossSum, masked_mean

DELTA_MODES = ("running_mean", "ema")
GEN_NORMS = ("batch-token-mean", "seq-mean")


@dataclasses.dataclass(frozen=True)
class MPOConfig:
    beta: float = 0.1
    w_pref: float = 0.8
    w_quality: float = 0.2
    w_gen: float = 1.0
    delta_mode: str = "running_mean"  # BCO shift δ: TRL/InternVL's running mean, or "ema" (bias-corrected)
    delta_decay: float = 0.99  # "ema" only: its decay
    gen_norm: str = "batch-token-mean"  # NLL per token of the whole batch (InternVL), or "seq-mean" per pair

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta: must be > 0, got {self.beta}")
        if min(self.w_pref, self.w_quality, self.w_gen) < 0:
            raise ValueError("MPO weights must be >= 0")
        if not 0 <= self.delta_decay < 1:
            raise ValueError(f"delta_decay: must be in [0, 1), got {self.delta_decay}")
        if self.delta_mode not in DELTA_MODES:
            raise ValueError(f"delta_mode: expected one of {DELTA_MODES}, got {self.delta_mode!r}")
        if self.gen_norm not in GEN_NORMS:
            raise ValueError(f"gen_norm: expected one of {GEN_NORMS}, got {self.gen_norm!r}")


def implicit_rewards(policy_logp: jax.Array, ref_logp: jax.Array, cfg: MPOConfig) -> jax.Array:
    """Δ(y) = β (log πθ(y|x) − log π_ref(y|x)) per sequence."""
    return cfg.beta * (policy_logp - ref_logp)


def mpo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    chosen_tokens: jax.Array,
    delta: jax.Array,
    cfg: MPOConfig,
    tokens_per_pair: jax.Array | None = None,
    valid: jax.Array | None = None,
) -> tuple[LossSum, dict[str, jax.Array]]:
    """MPO over a batch of B pairs.

    policy_*/ref_*: f32[B] sequence log-probs (sums over the response tokens) of the chosen
    and rejected responses; chosen_tokens: [B] token counts of the chosen responses; delta:
    f32[] the BCO shift (this batch already in it, see :func:`bco_delta_update`).
    tokens_per_pair: f32[] the *whole* batch's chosen tokens / pairs, for ``batch-token-mean``
    when this call sees one micro-batch (default: this call's own mean). Per pair the NLL is
    then −log π(y_c) / tokens_per_pair, whose mean over the batch is the batch token mean.
    valid: bool[B] or None: only these entries are pairs (packed batches' pair slots; the
    others count nothing, in the loss, its count and the metrics).
    Returns (LossSum with count B (valid pairs), metrics incl. the batch's rewards).
    """
    w = None if valid is None else valid.astype(jnp.float32)
    mean = (lambda x: x.mean()) if w is None else (lambda x: masked_mean(x, w))  # noqa: E731
    r_c = implicit_rewards(policy_chosen, ref_chosen, cfg)
    r_r = implicit_rewards(policy_rejected, ref_rejected, cfg)
    d = jax.lax.stop_gradient(delta)
    pref = -jax.nn.log_sigmoid(r_c - r_r)
    quality = -jax.nn.log_sigmoid(r_c - d) - jax.nn.log_sigmoid(-(r_r - d))
    n = chosen_tokens.astype(jnp.float32)
    if cfg.gen_norm == "seq-mean":
        gen = -policy_chosen / jnp.maximum(n, 1.0)
    else:
        per_pair_tokens = mean(n) if tokens_per_pair is None else tokens_per_pair
        gen = -policy_chosen / jnp.maximum(jax.lax.stop_gradient(per_pair_tokens), 1e-9)
    per_pair = cfg.w_pref * pref + cfg.w_quality * quality + cfg.w_gen * gen
    metrics = {
        "pref_loss": mean(pref),
        "quality_loss": mean(quality),
        "gen_loss": mean(gen),
        "reward_chosen": mean(r_c),
        "reward_rejected": mean(r_r),
        "reward_margin": mean(r_c - r_r),
        "reward_accuracy": mean((r_c > r_r).astype(jnp.float32)),
        "bco_delta": d,
    }
    if w is None:
        return LossSum(per_pair.sum(), jnp.asarray(per_pair.shape[0], jnp.float32)), metrics
    return LossSum(jnp.where(w > 0, per_pair, 0.0).sum(), w.sum()), metrics


def batch_reward_mean(
    reward_chosen: jax.Array, reward_rejected: jax.Array, valid: jax.Array | None = None
) -> jax.Array:
    """mean(Δ) over a batch's chosen and rejected responses together (what TRL's bco_pair feeds
    its running mean), without gradient; ``valid``: only those pairs (packed batches)."""
    both = jnp.concatenate([reward_chosen, reward_rejected])
    if valid is None:
        return jax.lax.stop_gradient(both.mean())
    return jax.lax.stop_gradient(masked_mean(both, jnp.concatenate([valid, valid]).astype(jnp.float32)))


def bco_delta_update(
    delta: jax.Array, count: jax.Array, batch_mean: jax.Array, cfg: MPOConfig
) -> tuple[jax.Array, jax.Array]:
    """(δ, batches seen) after one more batch whose mean reward is ``batch_mean``.

    running_mean: δ' = δ + (x − δ) / (n + 1) (δ_1 = x_1 exactly);
    ema: with m = δ (1 − decay^n), m' = decay·m + (1 − decay)·x, δ' = m' / (1 − decay^(n+1)).
    """
    n = count.astype(jnp.float32)
    x = jax.lax.stop_gradient(batch_mean).astype(jnp.float32)
    if cfg.delta_mode == "running_mean":
        new = delta + (x - delta) / (n + 1.0)
    else:
        dec = jnp.float32(cfg.delta_decay)
        m = delta * (1.0 - dec**n)
        new = (dec * m + (1.0 - dec) * x) / (1.0 - dec ** (n + 1.0))
    return new.astype(jnp.float32), (count + 1).astype(jnp.int32)


def dpo_config(beta: float = 0.1) -> MPOConfig:
    """MPO reduced to plain DPO."""
    return MPOConfig(beta=beta, w_pref=1.0, w_quality=0.0, w_gen=0.0)
