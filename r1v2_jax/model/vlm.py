"""The R1V2 vision-language model: ``logits = LLM(merge(adapter(ViT(images)), embed(text)))``."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from r1v2_jax.model.config import ModelConfig, model_config
from r1v2_jax.model.qwen2 import Qwen2, cache_mask, default_positions
from r1v2_jax.model.vision import Adapter, InternViT
from r1v2_jax.parallel.sharding import DEFAULT_RULES, constrain, tree_shardings, use_mesh_rules


def merge_image_features(
    text_embeds: jax.Array, input_ids: jax.Array, image_features: jax.Array, image_token_id: int
) -> jax.Array:
    """Replace the embeddings of ``<IMG_CONTEXT>`` tokens by adapter outputs, in order.

    Args:
      text_embeds: f[B, T, H], the token embeddings of ``input_ids``.
      input_ids: i32[B, T]; positions equal to ``image_token_id`` are image slots.
      image_features: f[N, H], adapter outputs of all tiles of all images, flattened in the
        order the tiles were given (tile-major, then the tile's tokens row by row).
      image_token_id: the id of ``<IMG_CONTEXT>``.

    Returns:
      f[B, T, H]: slot k (counting image slots in row-major order over [B, T]) holds
      ``image_features[k]``; every other position keeps its text embedding.

    The number of slots must equal N. Inside jit this cannot be checked; the
    :class:`R1V2Model` wrapper checks it on concrete inputs. Extra slots would read the last
    feature (indices are clamped), which is why the wrapper refuses them.
    """
    b, t, h = text_embeds.shape
    is_img = input_ids == image_token_id
    slot = jnp.cumsum(is_img.reshape(-1).astype(jnp.int32)) - 1
    slot = jnp.clip(slot, 0, max(image_features.shape[0] - 1, 0))
    gathered = jnp.take(image_features.astype(text_embeds.dtype), slot, axis=0).reshape(b, t, h)
    return jnp.where(is_img[..., None], gathered, text_embeds)


def merge_image_features_per_row(
    text_embeds: jax.Array, input_ids: jax.Array, image_features: jax.Array, image_token_id: int
) -> jax.Array:
    """Like :func:`merge_image_features`, but row b's slots take row b's own features.

    image_features: f[B, F, H] (row b's tiles' adapter outputs, zero-padded to F). Rows may
    have different numbers of tiles: padded features are never read as long as a row has
    no more slots than real features. This is the layout of training batches, where the
    G samples of a prompt each carry their prompt's tiles.
    """
    b, t, h = text_embeds.shape
    is_img = input_ids == image_token_id
    slot = jnp.clip(jnp.cumsum(is_img.astype(jnp.int32), axis=1) - 1, 0, max(image_features.shape[1] - 1, 0))
    gathered = jnp.take_along_axis(image_features.astype(text_embeds.dtype), slot[..., None], axis=1)
    return jnp.where(is_img[..., None], gathered, text_embeds)


class R1V2(nn.Module):
    """InternViT -> adapter (``mlp1``) -> Qwen2, with the multimodal merge in between."""

    config: ModelConfig

    def setup(self):
        self.vision_model = InternViT(self.config)
        self.mlp1 = Adapter(self.config)
        self.language_model = Qwen2(self.config)

    def encode_images(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values: f[n_tiles, 3, H, W] -> f[n_tiles * tokens_per_tile, H_llm]."""
        feats = self.mlp1(self.vision_model(pixel_values))
        return feats.reshape(-1, feats.shape[-1])

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None = None) -> jax.Array:
        """Input embeddings with image slots filled: f[B, T, H].

        pixel_values f[n_tiles, 3, H, W] fill the slots of the whole batch in order; f[B, K,
        3, H, W] gives each row its own K tiles (see :func:`merge_image_features_per_row`)."""
        embeds = self.language_model.embed(input_ids)
        if pixel_values is not None and pixel_values.ndim == 5:
            b, k = pixel_values.shape[:2]
            feats = self.encode_images(pixel_values.reshape((b * k,) + pixel_values.shape[2:]))
            embeds = merge_image_features_per_row(
                embeds, input_ids, feats.reshape(b, -1, feats.shape[-1]), self.config.image_token_id
            )
            embeds = constrain(embeds, ("act_batch", "act_len", "act_embed"))
        elif pixel_values is not None:
            embeds = merge_image_features(
                embeds, input_ids, self.encode_images(pixel_values), self.config.image_token_id
            )
            embeds = constrain(embeds, ("act_batch", "act_len", "act_embed"))
        return embeds

    def __call__(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """input_ids: i32[B, T]; pixel_values: f[n_tiles, 3, H, W] or None; attention_mask:
        [B, T] (1 = real token) or None; positions: i32[B, T] or None -> logits f[B, T, V]."""
        if positions is None:
            positions = default_positions(input_ids.shape, attention_mask)
        embeds = self.embed(input_ids, pixel_values)
        hidden = self.language_model.decode(embeds, positions, attention_mask)
        return self.language_model.logits(hidden)

    def hidden(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Final-normed hidden states f[B, T, H] (what the LM head and a value head read)."""
        if positions is None:
            positions = default_positions(input_ids.shape, attention_mask)
        return self.language_model.decode(self.embed(input_ids, pixel_values), positions, attention_mask)

    def prefill(
        self, input_ids: jax.Array, pixel_values: jax.Array | None, kv_valid: jax.Array, cache
    ) -> tuple[jax.Array, Any]:
        """Run the prompt into an empty KV cache.

        input_ids: i32[B, P] (left-padded); pixel_values: f[n_tiles, 3, H, W] or None;
        kv_valid: bool[B, S] (S >= P: slot j < P holds a real prompt token); cache: (k, v)
        each f[L, B, S, Hkv, hd]. Returns (logits of the last prompt position f[B, V], cache).
        """
        p = input_ids.shape[1]
        positions = default_positions(input_ids.shape, kv_valid[:, :p])
        embeds = self.embed(input_ids, pixel_values)
        mask = cache_mask(kv_valid, jnp.int32(0), p)
        hidden, cache = self.language_model.decode_cached(embeds, positions, mask, cache, jnp.int32(0))
        return self.language_model.logits(hidden[:, -1:])[:, 0], cache

    def decode_step(
        self, tokens: jax.Array, positions: jax.Array, kv_valid: jax.Array, cache, cache_index: jax.Array
    ) -> tuple[jax.Array, Any]:
        """One cached step. tokens, positions: i32[B, 1]; kv_valid: bool[B, S] (including the
        slot written now); cache_index: i32[] -> (logits f[B, V], cache)."""
        embeds = self.language_model.embed(tokens)
        mask = cache_mask(kv_valid, cache_index, tokens.shape[1])
        hidden, cache = self.language_model.decode_cached(embeds, positions, mask, cache, cache_index)
        return self.language_model.logits(hidden)[:, -1], cache


# ---------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------


def _dummy_inputs(config: ModelConfig):
    v = config.vision
    ids = jnp.zeros((1, config.tokens_per_tile() + 1), jnp.int32).at[0, 1:].set(config.image_token_id)
    pix = jnp.zeros((1, v.num_channels, config.tile_size, config.tile_size), jnp.float32)
    return ids, pix


def init_params(config: ModelConfig, rng: jax.Array, *, boxed: bool = False):
    """Random parameters (a nested dict under ``params``-less top level).

    ``boxed=True`` keeps Flax's ``LogicallyPartitioned`` boxes (the logical axis names)."""
    ids, pix = _dummy_inputs(config)
    variables = R1V2(config).init(rng, ids, pix)
    params = variables["params"]
    return params if boxed else nn.unbox(params)


def abstract_params(config: ModelConfig, *, boxed: bool = True):
    """ShapeDtypeStructs of every parameter, without allocating anything."""
    return jax.eval_shape(functools.partial(init_params, config, boxed=boxed), jax.random.key(0))


def param_shardings(config: ModelConfig, mesh, rules=DEFAULT_RULES):
    """NamedShardings for the (unboxed) parameter tree on ``mesh``."""
    return nn.unbox(
        tree_shardings(abstract_params(config, boxed=True), mesh, rules),
    )


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------
# The user-facing model object
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class R1V2Model:
    """A model ready to run: config + parameters (+ optional mesh), callable on arrays.

    ``model(input_ids, pixel_values=None)`` returns logits f32/bf16[B, T, V]. Forward passes
    are jitted once per input shape. With a ``mesh``, parameters are expected to be sharded
    on it (see :func:`param_shardings`) and activations are constrained by the rules table.
    """

    config: ModelConfig
    params: Any
    mesh: Any = None
    rules: tuple = DEFAULT_RULES

    def __post_init__(self):
        self.module = R1V2(self.config)
        self._forward = jax.jit(self._apply)

    def _apply(self, params, input_ids, pixel_values, attention_mask):
        with use_mesh_rules(self.mesh, self.rules):
            return self.module.apply({"params": params}, input_ids, pixel_values, attention_mask)

    def check_inputs(self, input_ids, pixel_values=None, attention_mask=None) -> None:
        """Raise ValueError for inputs the forward pass cannot use (on concrete arrays)."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids: expected an integer array [B, T], got {ids.dtype}{list(ids.shape)}")
        vocab = self.config.text.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"input_ids: ids must lie in [0, {vocab}), got min {ids.min()} max {ids.max()}")
        n_slots = int((ids == self.config.image_token_id).sum())
        if pixel_values is None:
            if n_slots:
                raise ValueError(
                    f"input_ids: {n_slots} <IMG_CONTEXT> tokens (id {self.config.image_token_id}) "
                    "but pixel_values is None"
                )
        else:
            shape = tuple(np.shape(pixel_values))
            v = self.config.vision
            tile = shape[-4:]
            if (
                len(shape) not in (4, 5)
                or tile[1] != v.num_channels
                or tile[2] % v.patch_size
                or tile[3] % v.patch_size
            ):
                raise ValueError(
                    f"pixel_values: expected [n_tiles, {v.num_channels}, H, W] or [B, K, "
                    f"{v.num_channels}, H, W] with H, W multiples of {v.patch_size}, got {list(shape)}"
                )
            if tile[2] != tile[3]:
                raise ValueError(
                    f"pixel_values: tiles must be square (InternVL reshapes the patch grid to a "
                    f"square), got H={tile[2]} W={tile[3]}"
                )
            per_tile = self.config.tokens_per_tile(tile[2])
            if len(shape) == 5:
                if shape[0] != ids.shape[0]:
                    raise ValueError(f"pixel_values: {shape[0]} rows of tiles for {ids.shape[0]} sequences")
                slots = (ids == self.config.image_token_id).sum(axis=1)
                if (slots > shape[1] * per_tile).any():
                    raise ValueError(
                        f"input_ids: a row has {int(slots.max())} <IMG_CONTEXT> tokens but only "
                        f"{shape[1]} tiles x {per_tile} features"
                    )
            elif n_slots != shape[0] * per_tile:
                raise ValueError(
                    f"input_ids has {n_slots} <IMG_CONTEXT> tokens but pixel_values gives {shape[0]} "
                    f"tiles x {per_tile} tokens = {shape[0] * per_tile} image features"
                )
        if attention_mask is not None and tuple(np.shape(attention_mask)) != ids.shape:
            raise ValueError(f"attention_mask: expected shape {list(ids.shape)}, got {list(np.shape(attention_mask))}")

    def __call__(self, input_ids, pixel_values=None, attention_mask=None) -> jax.Array:
        self.check_inputs(input_ids, pixel_values, attention_mask)
        ids = jnp.asarray(input_ids, jnp.int32)
        pix = None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32)
        return self._forward(self.params, ids, pix, attention_mask)

    @property
    def num_params(self) -> int:
        return count_params(self.params)


def init_model(config: ModelConfig | str, seed: int = 0, mesh=None, rules=DEFAULT_RULES) -> R1V2Model:
    """A randomly initialised model (sharded on ``mesh`` when given)."""

    config = model_config(config)
    init = functools.partial(init_params, config)
    if mesh is None:
        params = jax.jit(init)(jax.random.key(seed))
    else:
        params = jax.jit(init, out_shardings=param_shardings(config, mesh, rules))(jax.random.key(seed))
    return R1V2Model(config, params, mesh, rules)
