"""The Qwen2 decoder (QwQ-32B): GQA with q/k/v bias, RoPE, SwiGLU, RMSNorm, untied head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from r1v2_jax.model.attention import AttentionOptions, SegmentMask, attention
from r1v2_jax.model.config import ModelConfig, TextConfig
from r1v2_jax.model.layers import CKPT_ATTN_OUT, CKPT_QKV, Embed, LayerStack, Linear, RMSNorm
from r1v2_jax.parallel.sharding import constrain

ACT = ("act_batch", "act_len", "act_embed")
ACT_SEQ_PARALLEL = ("act_batch", "act_seq_shard", "act_embed")  # ModelConfig.sequence_parallel
# KV cache [L, B, S, Hkv, hd]
CACHE_AXES = ("layers", "act_batch", "act_len", "act_kv_heads", None)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin: f32[B, T, head_dim] for integer positions [B, T] (HF's non-interleaved layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, H, hd]; cos/sin: [B, T, hd]."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rot * sin


def init_cache(config: TextConfig, batch: int, length: int, dtype) -> tuple[jax.Array, jax.Array]:
    """Zeroed KV cache (k, v), each [L, B, length, Hkv, hd]."""
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.resolved_head_dim)
    return constrain(jnp.zeros(shape, dtype), CACHE_AXES), constrain(jnp.zeros(shape, dtype), CACHE_AXES)


def cache_mask(kv_valid: jax.Array, cache_index: jax.Array, t: int) -> jax.Array:
    """bool[B, 1, 1, t, S] for t queries written at slots cache_index..cache_index+t-1: query i
    sees slot j iff j <= cache_index + i and ``kv_valid[b, j]`` (slot holds a real token)."""
    s = kv_valid.shape[1]
    q_slot = cache_index + jnp.arange(t)[:, None]
    causal = jnp.arange(s)[None, :] <= q_slot  # [t, S]
    return (causal[None] & kv_valid.astype(bool)[:, None, :])[:, None, None]


def causal_mask(positions: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """bool[B, 1, 1, T, T]: query i sees key j iff j <= i (by sequence index) and j is not padding."""
    t = positions.shape[1]
    allowed = jnp.tril(jnp.ones((t, t), bool))[None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.astype(bool)[:, None, :]
    return allowed[:, None, None]


class TextAttention(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attn: AttentionOptions = AttentionOptions()

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, layer=None, cache_index=None):
        """x: f[B, T, H]; cos/sin: f32[B, T, hd]; mask: bool[B, 1, 1, T, S], or for full
        sequences without a cache a :class:`SegmentMask` (causal within segments), which runs
        the configured implementation (``attn``, see :mod:`r1v2_jax.model.attention`).

        Without a cache S = T. With ``cache`` = (k, v), the whole stack's cache, each
        f[L, B, S, Hkv, hd], this call's keys and values are written into layer ``layer`` at
        slots ``cache_index .. cache_index + T`` (an in-place update of the loop-carried
        buffer, never a copy of the cache) and attention runs over that layer's S slots (the
        mask says which are valid). Returns (f[B, T, H], updated cache or None).
        """
        c = self.cfg
        b, t, _ = x.shape
        hd, nh, nkv = c.resolved_head_dim, c.num_heads, c.num_kv_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = Linear(nh * hd, ("embed", "heads"), name="q_proj", **kw)(x).reshape(b, t, nh, hd)
        k = Linear(nkv * hd, ("embed", "kv_heads"), name="k_proj", **kw)(x).reshape(b, t, nkv, hd)
        v = Linear(nkv * hd, ("embed", "kv_heads"), name="v_proj", **kw)(x).reshape(b, t, nkv, hd)
        q, k, v = (checkpoint_name(a, CKPT_QKV) for a in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if hasattr(cache, "attend"):  # a paged KV cache (r1v2_jax.sampling.paged): it stores k, v and attends
            out, cache = cache.attend(q, k, v)
            out = checkpoint_name(out.reshape(b, t, nh * hd), CKPT_ATTN_OUT)
            return Linear(c.hidden_size, ("heads", "embed"), use_bias=False, name="o_proj", **kw)(out), cache
        if cache is not None:
            zero = jnp.zeros((), jnp.int32)
            start = (layer, zero, cache_index, zero, zero)
            cache = tuple(
                constrain(jax.lax.dynamic_update_slice(c_, new[None].astype(c_.dtype), start), CACHE_AXES)
                for c_, new in zip(cache, (k, v))
            )
            k, v = (jax.lax.dynamic_index_in_dim(c_, layer, axis=0, keepdims=False) for c_ in cache)
        if isinstance(mask, SegmentMask):
            out = attention(q, k, v, causal=True, segment_ids=mask.segment_ids, opts=self.attn)
        else:
            out = attention(q, k, v, causal=False, mask=mask)
        out = checkpoint_name(out.reshape(b, t, nh * hd), CKPT_ATTN_OUT)
        return Linear(c.hidden_size, ("heads", "embed"), use_bias=False, name="o_proj", **kw)(out), cache


class TextMLP(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        gate = Linear(c.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = Linear(c.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        h = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_len", "act_mlp"))
        return Linear(c.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(h)


class DecoderLayer(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attn: AttentionOptions = AttentionOptions()
    seq_parallel: bool = False  # the residual stream leaves the block split over tensor by sequence

    @nn.compact
    def __call__(self, carry, layer, cos, sin, mask, cache_index):
        """One pre-norm block. carry: (x, the stack's KV cache or None); layer: i32[] index of
        this layer (scanned). Returns ((x, cache), None)."""
        x, cache = carry
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x)
        h, cache = TextAttention(c, attn=self.attn, name="self_attn", **kw)(
            h, cos, sin, mask, cache, layer, cache_index
        )
        x = x + h
        h = RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        x = x + TextMLP(c, name="mlp", **kw)(h)
        return (constrain(x, ACT_SEQ_PARALLEL if self.seq_parallel else ACT), cache), None


class Qwen2(nn.Module):
    """The language model. ``embed`` / ``decode`` / ``logits`` are separate so the multimodal
    model can replace image-token embeddings in between."""

    config: ModelConfig

    def setup(self):
        mc, c = self.config, self.config.text
        kw = dict(dtype=jnp.dtype(mc.dtype), param_dtype=jnp.dtype(mc.param_dtype))
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), **kw)
        self.layers = LayerStack(
            DecoderLayer,
            dict(cfg=c, attn=mc.attention_options(), seq_parallel=mc.sequence_parallel, **kw),
            num_layers=c.num_layers,
            scan=mc.scan_layers,
            remat=mc.remat_policy,
            broadcast_args=4,
        )
        self.norm = RMSNorm(c.rms_norm_eps, **kw)
        self.lm_head = Linear(c.vocab_size, ("embed", "vocab"), use_bias=False, **kw)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: i32[B, T] -> f[B, T, H]."""
        return constrain(self.embed_tokens(input_ids), ACT_SEQ_PARALLEL if self.config.sequence_parallel else ACT)

    def decode(
        self, embeds: jax.Array, positions: jax.Array | None, attention_mask: jax.Array | None, rope=None
    ) -> jax.Array:
        """embeds: f[B, T, H]; positions: i32[B, T]; attention_mask: [B, T] segment ids (0 =
        padding; a 0/1 mask is one segment per row; packed rows number their sequences 1, 2,
        ...) or None -> final-normed f[B, T, H]. Causal attention within each segment.
        ``rope``: precomputed (cos, sin) f32[B, T, hd] used instead of ``positions`` (the
        multimodal rotary positions of :mod:`r1v2_jax.model.qwen2_5_vl`)."""
        seg = None if attention_mask is None else attention_mask.astype(jnp.int32)
        hidden, _ = self.decode_cached(embeds, positions, SegmentMask(seg), None, None, rope=rope)
        return hidden

    def decode_cached(self, embeds, positions, mask, cache, cache_index, rope=None):
        """The layer stack with an explicit mask and an optional KV cache.

        embeds: f[B, T, H]; positions: i32[B, T]; mask: bool[B, 1, 1, T, S] or (no cache) a
        :class:`SegmentMask`; cache: (k, v)
        each f[L, B, S, Hkv, hd] or None; cache_index: i32[] (first slot written); rope: None
        (tables from ``positions``) or (cos, sin) f32[B, T, hd] ->
        (final-normed f[B, T, H], updated cache or None).
        """
        c = self.config.text
        cos, sin = rope_tables(positions, c.resolved_head_dim, c.rope_theta) if rope is None else rope
        layers = jnp.arange(c.num_layers, dtype=jnp.int32) if cache is not None else None
        (x, cache), _ = self.layers((embeds, cache), layers, cos, sin, mask, cache_index)
        return self.norm(x), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden: f[B, T, H] -> f[B, T, V]."""
        return constrain(self.lm_head(hidden), ("act_batch", "act_len", "act_vocab"))

    def __call__(self, input_ids, positions=None, attention_mask=None):
        if positions is None:
            positions = default_positions(input_ids.shape, attention_mask)
        return self.logits(self.decode(self.embed(input_ids), positions, attention_mask))


def default_positions(shape: tuple[int, int], attention_mask: jax.Array | None) -> jax.Array:
    """Positions 0..T-1, or for a padded batch the count of real tokens before each one
    (so left padding does not shift RoPE)."""
    b, t = shape
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    m = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)
