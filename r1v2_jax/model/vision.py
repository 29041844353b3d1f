"""InternViT (the R1V2 vision encoder) and the MLP adapter (``mlp1``)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from r1v2_jax.model.attention import AttentionOptions, attention
from r1v2_jax.model.config import ModelConfig, VisionConfig
from r1v2_jax.model.interpolate import resize_grid
from r1v2_jax.model.layers import CKPT_ATTN_OUT, CKPT_QKV, LayerNorm, LayerStack, Linear, RMSNorm, gelu_exact, param
from r1v2_jax.parallel.sharding import constrain

ACT = ("act_batch", "act_len", "act_embed")


def _norm(cfg: VisionConfig, dtype, param_dtype, name: str) -> nn.Module:
    cls = RMSNorm if cfg.norm_type == "rms_norm" else LayerNorm
    return cls(eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, name=name)


class VisionAttention(nn.Module):
    """Bidirectional attention with a fused qkv projection and whole-vector qk-norm; the
    attention itself is :func:`r1v2_jax.model.attention.attention` with ``attn``'s implementation."""

    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attn: AttentionOptions = AttentionOptions()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: f[n, N, D] -> f[n, N, D]."""
        c = self.cfg
        n, seq, d = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = Linear(3 * d, ("vit_embed", "heads"), use_bias=c.qkv_bias, name="qkv", **kw)(x)
        qkv = checkpoint_name(qkv, CKPT_QKV)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        if c.qk_norm:  # over the whole D vector (all heads), before the split into heads
            q = _norm(c, self.dtype, self.param_dtype, "q_norm")(q)
            k = _norm(c, self.dtype, self.param_dtype, "k_norm")(k)
        heads = lambda t: t.reshape(n, seq, c.num_heads, c.head_dim)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        out = attention(q, k, v, causal=False, opts=self.attn, prescale=True).reshape(n, seq, d)
        out = checkpoint_name(out, CKPT_ATTN_OUT)
        return Linear(d, ("heads", "vit_embed"), name="proj", **kw)(out)


class VisionMLP(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Linear(self.cfg.intermediate_size, ("vit_embed", "mlp"), name="fc1", **kw)(x)
        h = gelu_exact(h)
        return Linear(self.cfg.hidden_size, ("mlp", "vit_embed"), name="fc2", **kw)(h)


class VisionBlock(nn.Module):
    """``h += attn(norm1(h)) * ls1; h += mlp(norm2(h)) * ls2``."""

    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attn: AttentionOptions = AttentionOptions()

    @nn.compact
    def __call__(self, x: jax.Array, active: jax.Array | None):
        """x: f[n, N, D]; active: bool[] (scan) or None. Returns (x, None) for scan."""
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ls_init = nn.initializers.constant(c.layer_scale_init)
        ls1 = param(self, "ls1", ls_init, (c.hidden_size,), ("norm",), self.param_dtype)
        ls2 = param(self, "ls2", ls_init, (c.hidden_size,), ("norm",), self.param_dtype)
        h = VisionAttention(c, attn=self.attn, name="attn", **kw)(_norm(c, self.dtype, self.param_dtype, "norm1")(x))
        y = x + h * ls1.astype(self.dtype)
        h = VisionMLP(c, name="mlp", **kw)(_norm(c, self.dtype, self.param_dtype, "norm2")(y))
        y = y + h * ls2.astype(self.dtype)
        y = constrain(y, ACT)
        if active is not None:  # select_layer < last: later layers exist but leave x unchanged
            y = jnp.where(active, y, x)
        return y, None


class VisionEmbeddings(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values: f[n, C, H, W] (NCHW, H and W multiples of the patch) -> f[n, 1+gh*gw, D]."""
        c = self.cfg
        n, ch, hgt, wid = pixel_values.shape
        p = c.patch_size
        if ch != c.num_channels or hgt % p or wid % p:
            raise ValueError(
                f"pixel_values: expected [n, {c.num_channels}, H, W] with H, W multiples of {p}, "
                f"got {tuple(pixel_values.shape)}"
            )
        gh, gw = hgt // p, wid // p
        init = nn.initializers.normal(0.02)
        cls_tok = param(
            self, "class_embedding", init, (1, 1, c.hidden_size), (None, None, "vit_embed"), self.param_dtype
        )
        kernel = param(
            self,
            "patch_kernel",
            init,
            (p, p, c.num_channels, c.hidden_size),
            ("patch", "patch", "patch", "vit_embed"),
            self.param_dtype,
        )
        bias = param(self, "patch_bias", nn.initializers.zeros, (c.hidden_size,), ("norm",), self.param_dtype)
        pos = param(
            self,
            "position_embedding",
            init,
            (1, c.num_positions, c.hidden_size),
            (None, "positions", "vit_embed"),
            self.param_dtype,
        )
        # A stride-p conv with a p x p kernel is a matmul over non-overlapping patches.
        x = pixel_values.astype(self.dtype).reshape(n, ch, gh, p, gw, p)
        x = x.transpose(0, 2, 4, 3, 5, 1).reshape(n, gh * gw, p * p * ch)
        w = kernel.astype(self.dtype).reshape(p * p * ch, c.hidden_size)
        patches = jnp.einsum("npk,kd->npd", x, w) + bias.astype(self.dtype)
        cls_tok = jnp.broadcast_to(cls_tok.astype(self.dtype), (n, 1, c.hidden_size))
        x = jnp.concatenate([cls_tok, patches], axis=1)
        g = c.grid_size
        grid = resize_grid(pos[0, 1:].reshape(g, g, c.hidden_size).astype(jnp.float32), gh, gw)
        pos_all = jnp.concatenate([pos[0, :1].astype(jnp.float32), grid.reshape(gh * gw, -1)], axis=0)
        return x + pos_all.astype(self.dtype)[None]


class InternViT(nn.Module):
    """The vision tower. Returns the hidden states of layer ``select_layer`` (no final norm)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values: f[n, C, H, W] -> f[n, 1 + (H/p)(W/p), D] (CLS first)."""
        mc, c = self.config, self.config.vision
        kw = dict(dtype=jnp.dtype(mc.dtype), param_dtype=jnp.dtype(mc.param_dtype))
        x = VisionEmbeddings(c, name="embeddings", **kw)(pixel_values)
        x = constrain(x, ACT)
        used = mc.vision_layers_used
        active = None if used == c.num_layers else jnp.asarray(np.arange(c.num_layers) < used)
        x, _ = LayerStack(
            VisionBlock,
            dict(cfg=c, attn=mc.attention_options(), **kw),
            num_layers=c.num_layers,
            scan=mc.scan_layers,
            remat=mc.remat_policy,
            broadcast_args=0,
            name="layers",
        )(x, active)
        return x


def pixel_shuffle(x: jax.Array, ratio: float, version: str) -> jax.Array:
    """InternVL's pixel shuffle. x: f[n, w, h, c] -> f[n, h*r, w*r, c/r²] (v1) or its
    spatial transpose (v2), r = ``ratio`` (0.5: 2x2 neighbourhoods folded into channels)."""
    n, w, h, c = x.shape
    k = int(round(1 / ratio))
    x = x.reshape(n, w, h // k, c * k)
    x = x.transpose(0, 2, 1, 3)
    x = x.reshape(n, h // k, w // k, c * k * k)
    if version == "v2":
        x = x.transpose(0, 2, 1, 3)
    return x


class Adapter(nn.Module):
    """``mlp1``: LayerNorm(D·k²) -> Linear -> GELU -> Linear, on pixel-shuffled ViT features."""

    config: ModelConfig

    @nn.compact
    def __call__(self, vit_features: jax.Array) -> jax.Array:
        """vit_features: f[n, 1+g², D_vit] (CLS first) -> f[n, (g/k)², D_llm]."""
        mc = self.config
        kw = dict(dtype=jnp.dtype(mc.dtype), param_dtype=jnp.dtype(mc.param_dtype))
        x = vit_features[:, 1:]
        n, npatch, d = x.shape
        g = int(round(npatch**0.5))
        if g * g != npatch:
            raise ValueError(f"adapter: the patch grid must be square, got {npatch} patches")
        x = pixel_shuffle(x.reshape(n, g, g, d), mc.downsample_ratio, mc.ps_version)
        x = x.reshape(n, -1, x.shape[-1])
        x = LayerNorm(eps=mc.projector_norm_eps, names=("mlp",), name="norm", **kw)(x)
        x = Linear(mc.text.hidden_size, ("mlp", "embed"), name="fc1", **kw)(x)
        x = gelu_exact(x)
        return Linear(mc.text.hidden_size, (None, "embed"), name="fc2", **kw)(x)
