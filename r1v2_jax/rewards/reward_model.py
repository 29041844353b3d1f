"""A JAX reward model: the R1V2 backbone with a scalar value head at the last real token.

Parameters are ``{"backbone": <policy parameter tree>, "value_head": {...}}``, so a policy
checkpoint (``load_checkpoint`` / ``load_pretrained``) initialises the backbone directly.
Trained with the Bradley–Terry loss ``−log σ(r⁺ − r⁻)``; :func:`make_scorer` gives a batched
jitted scoring function.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from r1v2_jax.model.config import ModelConfig
from r1v2_jax.model.layers import Linear
from r1v2_jax.model.vlm import R1V2, _dummy_inputs
from r1v2_jax.rl.losses import LossSum, masked_mean


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of the last real token per row (works for left and right padding): i32[B]."""
    t = attention_mask.shape[1]
    return (t - 1 - jnp.argmax(attention_mask[:, ::-1].astype(jnp.int32), axis=1)).astype(jnp.int32)


class RewardModel(nn.Module):
    config: ModelConfig

    def setup(self):
        self.backbone = R1V2(self.config)
        self.value_head = Linear(
            1, ("embed", None), use_bias=True, dtype=jnp.float32, kernel_init=nn.initializers.normal(0.01)
        )

    def __call__(self, input_ids, pixel_values=None, attention_mask=None) -> jax.Array:
        """input_ids i32[B, T]; attention_mask [B, T] (1 = real) -> scores f32[B]."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        hidden = self.backbone.hidden(input_ids, pixel_values, attention_mask)
        last = hidden[jnp.arange(hidden.shape[0]), last_token_index(attention_mask)]
        return self.value_head(last.astype(jnp.float32))[:, 0]

    def token_scores(self, input_ids, pixel_values, segment_ids, positions) -> jax.Array:
        """The score read at every token of packed rows (segment ids [B, T], 0 = padding;
        positions restarting per sequence) -> f32[B, T]; a sequence's score is at its last token."""
        hidden = self.backbone.hidden(input_ids, pixel_values, segment_ids, positions)
        return self.value_head(hidden.astype(jnp.float32))[..., 0]


def init_reward_params(config: ModelConfig, rng: jax.Array, backbone_params=None):
    """Reward-model parameters; ``backbone_params`` (a policy's) replaces the random backbone."""

    ids, pix = _dummy_inputs(config)  # with an image, so the vision tower's parameters exist too
    params = nn.unbox(RewardModel(config).init(rng, ids, pix)["params"])
    if backbone_params is not None:
        params = dict(params, backbone=backbone_params)
    return params


def bradley_terry_loss(r_pos: jax.Array, r_neg: jax.Array, valid: jax.Array | None = None) -> tuple[LossSum, dict]:
    """−log σ(r⁺ − r⁻) per pair, as (sum, count); metrics: pairwise accuracy and margin.
    ``valid``: bool[B], only these entries are pairs (packed batches' pair slots)."""
    loss = -jax.nn.log_sigmoid(r_pos - r_neg)
    if valid is None:
        return LossSum(loss.sum(), jnp.asarray(loss.shape[0], jnp.float32)), {
            "bt_accuracy": (r_pos > r_neg).astype(jnp.float32).mean(),
            "bt_margin": (r_pos - r_neg).mean(),
        }
    w = valid.astype(jnp.float32)
    return LossSum(jnp.where(valid, loss, 0.0).sum(), w.sum()), {
        "bt_accuracy": masked_mean((r_pos > r_neg).astype(jnp.float32), w),
        "bt_margin": masked_mean(r_pos - r_neg, w),
    }


def make_scorer(config: ModelConfig):
    """A jitted ``score(params, input_ids, pixel_values, attention_mask) -> f32[B]``."""
    module = RewardModel(config)
    return jax.jit(lambda p, ids, pix, mask: module.apply({"params": p}, ids, pix, mask))


def abstract_reward_params(config: ModelConfig, *, boxed: bool = True):
    """The reward model's parameters as ShapeDtypeStructs (boxed: with logical axis names)."""
    ids, pix = _dummy_inputs(config)
    tree = jax.eval_shape(lambda: RewardModel(config).init(jax.random.PRNGKey(0), ids, pix))["params"]
    return tree if boxed else nn.unbox(tree)
