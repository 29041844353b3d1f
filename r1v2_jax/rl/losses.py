"""GRPO's clipped policy loss, KL penalties and loss aggregation, as pure functions.

Every loss comes back as a :class:`LossSum` (sum, count) so that accumulating over
micro-batches is exact: add the pairs, divide once at the end (:func:`LossSum.value`).

Shapes: N sequences (completions) of T tokens. ``mask`` f32/bool[N, T] marks completion
tokens that count (1) and padding (0).
"""

from __future__ import annotations

import dataclasses
import math

import flax
import jax
import jax.numpy as jnp

AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


@flax.struct.dataclass
class LossSum:
    """A loss as (sum, count): ``value = sum / count``. Add two to accumulate micro-batches."""

    sum: jax.Array
    count: jax.Array

    def __add__(self, other: "LossSum") -> "LossSum":
        return LossSum(self.sum + other.sum, self.count + other.count)

    @property
    def value(self) -> jax.Array:
        return self.sum / jnp.maximum(self.count, 1e-9)


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """GRPO/DAPO/Dr.GRPO policy-loss settings (static)."""

    clip_low: float = 0.2  # ratio lower bound 1 - clip_low
    clip_high: float = 0.2  # ratio upper bound 1 + clip_high (DAPO's clip-higher: e.g. 0.28)
    dual_clip: float | None = None  # c > 1: for negative advantages, loss <= c * |A| (None = off)
    log_ratio_clamp: float = 20.0  # log-ratio clamped to +-this before exp
    kl_coef: float = 0.0  # weight of the KL penalty to the reference policy (0 = off)
    kl_estimator: str = "k3"
    aggregation: str = "seq-mean-token-mean"
    norm_tokens: int | None = None  # seq-mean-token-sum-norm: the constant divisor (e.g. max new tokens)
    # k3 KL, for numerical safety as verl clamps it: log π_ref − log π to ±kl_log_ratio_clamp
    # before exp, and the estimate to <= kl_max (padding positions are masked before either)
    kl_log_ratio_clamp: float = 20.0
    kl_max: float = 10.0
    # truncated importance sampling (verl's TIS), 0 = off: the clipped ratio is taken against
    # the learner's own log-probs at the start of the update (the proximal policy), and each
    # token's loss is weighted by min(π_learner / π_sampling, tis_cap), the sampling engine's
    # log-probs being ``old_logp`` (see :func:`policy_loss`)
    tis_cap: float = 0.0

    def __post_init__(self):
        if not (math.isfinite(self.tis_cap) and (self.tis_cap == 0 or self.tis_cap >= 1)):
            raise ValueError(f"tis_cap: must be 0 (off) or >= 1 (verl uses 2), got {self.tis_cap}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator: expected one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip: must be > 1 (or None), got {self.dual_clip}")
        if self.clip_low < 0 or self.clip_high < 0 or self.clip_low >= 1:
            raise ValueError(
                f"clip_low/clip_high: need 0 <= clip_low < 1 and clip_high >= 0, got {self.clip_low}, {self.clip_high}"
            )
        if self.kl_log_ratio_clamp <= 0 or self.kl_max <= 0:
            raise ValueError(f"kl_log_ratio_clamp/kl_max: must be > 0, got {self.kl_log_ratio_clamp}, {self.kl_max}")
        if self.aggregation == "seq-mean-token-sum-norm" and not self.norm_tokens:
            raise ValueError("aggregation seq-mean-token-sum-norm needs norm_tokens (e.g. max new tokens)")


def kl_penalty(
    logp: jax.Array,
    ref_logp: jax.Array,
    estimator: str = "k3",
    mask: jax.Array | None = None,
    log_ratio_clamp: float = 20.0,
    k3_max: float = 10.0,
) -> jax.Array:
    """Per-token estimate of KL(π‖π_ref) from samples of π.

    k1 = logπ − logπ_ref;  k2 = ½ (logπ − logπ_ref)²;
    k3 = exp(x) − x − 1 (≥ 0) with x = clamp(logπ_ref − logπ, ±log_ratio_clamp), then min(k3, k3_max)
    (verl's ``low_var_kl`` bounds: 20 and 10). Positions where ``mask`` is 0 get exactly 0 and
    are zeroed *before* the exp, so padding (whose log-probs may differ by anything) can never
    give inf, and inf × 0 = NaN, in the loss or its gradient.
    """
    d = logp - ref_logp
    if mask is not None:
        d = jnp.where(mask > 0, d, 0.0)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        x = jnp.clip(-d, -log_ratio_clamp, log_ratio_clamp)
        return jnp.minimum(jnp.exp(x) - x - 1.0, k3_max)
    raise ValueError(f"kl_estimator: expected one of {KL_ESTIMATORS}, got {estimator!r}")


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str, norm_tokens: int | None = None) -> LossSum:
    """Reduce per-token values f32[N, T] to a LossSum.

    * ``seq-mean-token-mean`` (the paper's GRPO): mean over sequences of each sequence's token mean;
    * ``token-mean`` (DAPO): mean over all tokens of the batch;
    * ``seq-mean-token-sum``: mean over sequences of each sequence's token sum (verl's mode of
      that name);
    * ``seq-mean-token-sum-norm`` (Dr. GRPO): mean over sequences of token sums / ``norm_tokens``.
      verl's mode of that name returns Σ token sums / ``loss_scale_factor`` without dividing by
      the number of sequences N: verl's value (and gradient) is N times ours. Under Adam the two
      differ only through ``eps`` and gradient-norm clipping; with a fixed N per step, ours is
      verl's with the learning rate and clip threshold divided by N.

    Sequences without any counted token are left out of the sequence count (as verl does).
    """
    m = mask.astype(jnp.float32)
    x = per_token * m
    if mode == "token-mean":
        return LossSum(x.sum(), m.sum())
    n_tok = m.sum(axis=1)
    has = (n_tok > 0).astype(jnp.float32)
    if mode == "seq-mean-token-mean":
        return LossSum((x.sum(axis=1) / jnp.maximum(n_tok, 1.0)).sum(), has.sum())
    if mode == "seq-mean-token-sum":
        return LossSum(x.sum(), has.sum())
    if mode == "seq-mean-token-sum-norm":
        return LossSum((x.sum(axis=1) / float(norm_tokens)).sum(), has.sum())
    raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {mode!r}")


def token_entropy(logits: jax.Array) -> jax.Array:
    """Entropy of softmax(logits) per position: f[..., V] -> f32[...]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def masked_mean(x, m):
    """Mean of x over the entries where m (0/1 or bool, broadcastable) is set; 0 when none is."""
    return (x * m).sum() / jnp.maximum(m.sum(), 1.0)


def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    cfg: PolicyLossConfig,
    ref_logp: jax.Array | None = None,
    entropy: jax.Array | None = None,
) -> tuple[LossSum, dict[str, jax.Array]]:
    """GRPO's clipped surrogate (+ optional KL), aggregated.

    logp: f32[N, T] log-probs of the sampled tokens under the policy being trained;
    old_logp: f32[N, T] under the sampling policy; advantages: f32[N] (one per sequence);
    mask: [N, T]; ref_logp: f32[N, T] under the reference (needed when kl_coef > 0);
    entropy: f32[N, T] optional, only reported.

    Per token, with ρ = exp(clamp(logp − old_logp)):
      pg = max(−Â ρ, −Â clip(ρ, 1 − clip_low, 1 + clip_high)), and with dual clip, for Â < 0,
      pg = min(pg, −Â c). The gradient is exactly zero where the clipped branch is taken.
    With ``cfg.tis_cap`` = C > 0 (truncated importance sampling, as verl's TIS): the proximal
    log-probs π_prox = stop_gradient(logp) (the learner's, at the parameters the gradient is
    taken at: one optimizer update per batch) replace old_logp in ρ, and pg is weighted by
    w = min(exp(clamp(π_prox − old_logp)), C) (no gradient through w): the correction from the
    sampling engine's policy (old_logp: the policy that generated the samples, one step stale
    with ``grpo.rollout_ahead=1``) to the learner's.
    Returns (LossSum of pg + kl_coef · KL, metrics) — metrics are masked token means of this
    batch: clip fractions, ratio mean/min/max, KL, entropy; with TIS also the importance
    ratio's mean/max (``is_ratio_*``) and the share of tokens whose ratio was capped (``tis_capped_frac``).
    """
    m = mask.astype(jnp.float32)
    adv = advantages.astype(jnp.float32)[:, None]
    # padding masked before the exp: whatever log-probs it holds, it contributes exactly 0
    behaviour = jax.lax.stop_gradient(logp) if cfg.tis_cap else old_logp
    log_ratio = jnp.clip(jnp.where(m > 0, logp - behaviour, 0.0), -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    ratio = jnp.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    pg = jnp.maximum(pg1, pg2)
    dual_clipped = jnp.zeros_like(pg, bool)
    if cfg.dual_clip is not None:
        pg3 = -adv * cfg.dual_clip
        dual_clipped = (adv < 0) & (pg > pg3)
        pg = jnp.where(adv < 0, jnp.minimum(pg, pg3), pg)
    metrics = {}
    if cfg.tis_cap:
        is_log = jnp.clip(
            jnp.where(m > 0, jax.lax.stop_gradient(logp) - old_logp, 0.0), -cfg.log_ratio_clamp, cfg.log_ratio_clamp
        )
        is_ratio = jnp.exp(is_log)
        pg = pg * jnp.minimum(is_ratio, cfg.tis_cap)
        metrics.update(
            is_ratio_mean=masked_mean(is_ratio, m),
            is_ratio_max=jnp.where(m > 0, is_ratio, -jnp.inf).max(),
            tis_capped_frac=masked_mean((is_ratio > cfg.tis_cap).astype(jnp.float32), m),
        )
    per_token = pg
    if cfg.kl_coef and ref_logp is None:
        raise ValueError("policy_loss: kl_coef > 0 needs ref_logp")
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, cfg.kl_estimator, m, cfg.kl_log_ratio_clamp, cfg.kl_max)
        if cfg.kl_coef:
            per_token = per_token + cfg.kl_coef * kl
        metrics["kl"] = masked_mean(kl, m)
    loss = aggregate(per_token, m, cfg.aggregation, cfg.norm_tokens)
    clipped_high = (adv > 0) & (ratio > 1.0 + cfg.clip_high)
    clipped_low = (adv < 0) & (ratio < 1.0 - cfg.clip_low)
    big = jnp.where(m > 0, ratio, -jnp.inf)
    small = jnp.where(m > 0, ratio, jnp.inf)
    metrics.update(
        pg_loss=aggregate(pg, m, cfg.aggregation, cfg.norm_tokens).value,
        clip_frac=masked_mean((clipped_high | clipped_low).astype(jnp.float32), m),
        clip_frac_high=masked_mean(clipped_high.astype(jnp.float32), m),
        clip_frac_low=masked_mean(clipped_low.astype(jnp.float32), m),
        dual_clip_frac=masked_mean(dual_clipped.astype(jnp.float32), m),
        ratio_mean=masked_mean(ratio, m),
        ratio_max=big.max(),
        ratio_min=small.min(),
    )
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy, m)
    return loss, metrics


def sequence_logprobs(token_logp: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of token log-probs per sequence: f32[N, T], [N, T] -> f32[N]."""
    return (token_logp * mask.astype(token_logp.dtype)).sum(axis=-1)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[target] per position: f[N, T, V], i32[N, T] -> f32[N, T]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
