"""Skywork-VL-Reward in JAX: Qwen2.5-VL with a scalar value head at the last real token.

Parameters are ``{"backbone": <Qwen2.5-VL tree>, "value_head": {"kernel" [H, 1], "bias" [1]}}``
(:func:`r1v2_jax.convert.skywork_vl.load_skywork_vl` builds them from the released files).
The score of a sequence is ``v_head(h_last)`` with ``h_last`` the final-normed hidden state
of its last real token, as TRL's value head reads it (its dropout is identity at inference).

:func:`make_vl_scorer` is the trainer's entry point, shaped like
:func:`r1v2_jax.rewards.reward_model.make_scorer`:
``score(params, input_ids, pixel_values, image_grid_thw, attention_mask) -> f32[B]``; the
M-RoPE positions are computed on the host from the ids and grids, and the jitted forward is
compiled once per distinct set of grids (the window permutation depends on them).
:func:`score_texts` builds the batch from prompts and PIL images.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from r1v2_jax.data.qwen_vl_image import chat_prompt, preprocess_images
from r1v2_jax.model.layers import Linear
from r1v2_jax.model.qwen2_5_vl import Grids, QwenVL, QwenVLConfig, dummy_inputs, rope_index
from r1v2_jax.parallel.sharding import DEFAULT_RULES, tree_shardings, use_mesh_rules
from r1v2_jax.rewards.reward_model import last_token_index


class VLRewardModel(nn.Module):
    config: QwenVLConfig

    def setup(self):
        self.backbone = QwenVL(self.config)
        self.value_head = Linear(1, ("embed", None), use_bias=True, dtype=jnp.float32)

    def __call__(self, input_ids, pixel_values, grids: Grids, positions, attention_mask) -> jax.Array:
        """input_ids i32[B, T]; pixel_values f[N, patch_dim] or None; grids static;
        positions i32[3, B, T]; attention_mask [B, T] (1 = real) -> scores f32[B]."""
        hidden = self.backbone.hidden(input_ids, pixel_values, grids, positions, attention_mask)
        last = hidden[jnp.arange(hidden.shape[0]), last_token_index(attention_mask)]
        return self.value_head(last.astype(jnp.float32))[:, 0]

    def scores_and_logits(self, input_ids, pixel_values, grids: Grids, positions, attention_mask):
        """(scores f32[B], logits f[B, T, V] or None without an LM head); init runs it so the
        parameter tree holds the LM head exactly when the checkpoint does."""
        scores = self(input_ids, pixel_values, grids, positions, attention_mask)
        if not self.config.lm_head:
            return scores, None
        return scores, self.backbone(input_ids, pixel_values, grids, positions, attention_mask)


_ALL = VLRewardModel.scores_and_logits


def init_vl_reward_params(config: QwenVLConfig, rng: jax.Array) -> dict:
    """Random reward-model parameters (tests, planning)."""
    ids, pix, grids, pos = dummy_inputs(config)
    mask = jnp.ones(ids.shape, jnp.int32)
    return nn.unbox(VLRewardModel(config).init(rng, ids, pix, grids, pos, mask, method=_ALL)["params"])


def _grids(image_grid_thw) -> Grids:
    if image_grid_thw is None:
        return ()
    return tuple(tuple(int(v) for v in g) for g in np.asarray(image_grid_thw).reshape(-1, 3))


def vl_reward_shardings(config: QwenVLConfig, mesh, rules=DEFAULT_RULES):
    """NamedShardings of the (unboxed) parameter tree on ``mesh`` (``jax.device_put`` the
    loaded numpy tree with them)."""
    return nn.unbox(tree_shardings(abstract_vl_reward_params(config), mesh, rules))


def make_vl_scorer(config: QwenVLConfig, mesh=None, rules=DEFAULT_RULES) -> Callable:
    """``score(params, input_ids, pixel_values, image_grid_thw, attention_mask) -> f32[B]``.

    input_ids i32[B, T] (left or right padded); pixel_values f32[N, patch_dim] of all images
    of the batch in row order (or None); image_grid_thw i[num_images, 3] (or None);
    attention_mask [B, T] (1 = real; None: all real). With ``mesh`` the forward runs under its
    sharding rules (parameters placed by :func:`vl_reward_shardings`, activations constrained
    to the logical axes)."""
    module = VLRewardModel(config)

    def apply(p, ids, pix, pos, mask, grids):
        if mesh is None:
            return module.apply({"params": p}, ids, pix, grids, pos, mask)
        with use_mesh_rules(mesh, rules):
            return module.apply({"params": p}, ids, pix, grids, pos, mask)

    fwd = jax.jit(apply, static_argnums=5)

    def score(params, input_ids, pixel_values, image_grid_thw, attention_mask=None) -> jax.Array:
        ids = np.asarray(input_ids)
        mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
        grids = _grids(image_grid_thw)
        pos = rope_index(ids, mask, grids, config.image_token_id, config.vision.spatial_merge_size)
        pix = None if pixel_values is None or not grids else jnp.asarray(pixel_values)
        return fwd(params, jnp.asarray(ids, jnp.int32), pix, jnp.asarray(pos), jnp.asarray(mask), grids)

    return score


def score_texts(
    score: Callable,
    params,
    tokenizer: Callable[[str], Sequence[int]],
    items: Sequence[tuple[str, str, Sequence]],
    *,
    pad_id: int = 0,
    **image_kw,
) -> np.ndarray:
    """Scores of ``(question, response, [PIL images])`` items: each prompt through Qwen2.5-VL's
    chat template with its image pads, ``tokenizer`` (text -> ids), right padding with
    ``pad_id``, one batched call of ``score`` (from :func:`make_vl_scorer`)."""
    rows, pixels, grids = [], [], []
    for question, response, images in items:
        pix, g = preprocess_images(list(images), **image_kw)
        rows.append(list(tokenizer(chat_prompt(question, response, g))))
        if g:
            pixels.append(pix)
            grids.extend(g)
    t = max(len(r) for r in rows)
    ids = np.full((len(rows), t), pad_id, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    pix = np.concatenate(pixels) if pixels else None
    return np.asarray(score(params, ids, pix, np.asarray(grids) if grids else None, mask))


def abstract_vl_reward_params(config: QwenVLConfig, *, boxed: bool = True):
    """The reward model's parameters as ShapeDtypeStructs (boxed: with logical axis names)."""
    ids, pix, grids, pos = dummy_inputs(config)
    mask = jnp.ones(ids.shape, jnp.int32)
    tree = jax.eval_shape(
        lambda: VLRewardModel(config).init(jax.random.PRNGKey(0), ids, pix, grids, pos, mask, method=_ALL)
    )
    return tree["params"] if boxed else nn.unbox(tree["params"])
