"""Qwen2.5-VL (the backbone of Skywork-VL-Reward) in Flax.

``y = Qwen2(M-RoPE)(scatter(text embeddings, merger(ViT(patches))))``:

* **Vision encoder**: patches of 14×14 pixels over ``temporal_patch_size`` = 2 frames (a still
  image is repeated over both, as the image processor does) flattened to
  ``f[N, C·2·14·14]`` and embedded by a bias-free linear map (HF's Conv3d with kernel =
  stride). 2D rotary embeddings (row and column index, each over a quarter of the head dim),
  pre-norm blocks with RMSNorm (eps 1e-6), fused-qkv attention with bias and a SwiGLU MLP
  with bias. Blocks listed in ``fullatt_block_indexes`` attend over the whole image (frame),
  the others within windows of ``window_size`` pixels (``window_size / 28`` merged patches a
  side, partial at the right and bottom edges). The sequence is permuted window-major
  before the blocks (:func:`window_index`) and back after the merger.
* **Patch merger**: RMSNorm, 2×2 neighbouring patches concatenated (they are adjacent in
  the processor's order), Linear → GELU (erf) → Linear to the LLM width.
* **LLM**: our :class:`r1v2_jax.model.qwen2.Qwen2` decoder with multimodal rotary
  positions (M-RoPE): three position rows (temporal, height, width), frequency band ``j`` of
  the head dim reading row ``s(j)`` given by ``mrope_section`` (:func:`mrope_tables`);
  positions as transformers' ``get_rope_index`` computes them (:func:`rope_index`).

Grids (``(t, h, w)`` per image, in patches) are static Python tuples: the window permutation
and the segment ids derive from them on the host, so each distinct set of grids compiles once.
Attention runs through :func:`r1v2_jax.model.attention.attention` (vision: non-causal with
segment ids per window or per frame).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from r1v2_jax.model.attention import AttentionOptions, attention
from r1v2_jax.model.config import ConfigError, TextConfig
from r1v2_jax.model.layers import LayerStack, Linear, RMSNorm, gelu_exact
from r1v2_jax.model.qwen2 import Qwen2, apply_rope
from r1v2_jax.model.vlm import merge_image_features
from r1v2_jax.parallel.sharding import constrain

Grids = tuple[tuple[int, int, int], ...]
VIT_ACT = ("act_batch", "act_len", "act_embed")


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
    """The Qwen2.5-VL vision encoder (``vision_config`` of the released config.json)."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    in_channels: int = 3
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: C · temporal_patch_size · patch_size²."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    def validate(self, where: str = "vision_config") -> None:
        for f in ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size", "patch_size"):
            _check(int(getattr(self, f)) > 0, f"{where}.{f}", f"must be a positive integer, got {getattr(self, f)!r}")
        _check(self.hidden_size % self.num_heads == 0, f"{where}.hidden_size", "not divisible by num_heads")
        _check(self.head_dim % 4 == 0, f"{where}.hidden_size", "2D rotary needs head_dim divisible by 4")
        unit = self.patch_size * self.spatial_merge_size
        _check(self.window_size % unit == 0, f"{where}.window_size", f"{self.window_size} not a multiple of {unit}")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        _check(not bad, f"{where}.fullatt_block_indexes", f"{bad} outside 0..{self.depth - 1}")


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
    """Qwen2.5-VL: vision encoder, Qwen2 text model with M-RoPE, token ids; how it runs."""

    vision: QwenVisionConfig
    text: TextConfig
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    lm_head: bool = True  # the released RM may ship without the LM head (scores only)
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "auto"
    sequence_parallel: bool = False  # as ModelConfig.sequence_parallel (the Qwen2 decoder reads it)
    attention_chunk_size: int = 512
    attention_interpret: bool = False

    def __post_init__(self):
        self.vision.validate()
        self.text.validate()
        _check(
            2 * sum(self.mrope_section) == self.text.resolved_head_dim,
            "rope_scaling.mrope_section",
            f"{list(self.mrope_section)} sums to {sum(self.mrope_section)}, expected head_dim/2 = "
            f"{self.text.resolved_head_dim // 2}",
        )
        _check(len(self.mrope_section) == 3, "rope_scaling.mrope_section", "expected 3 sections (t, h, w)")
        self.attention_options()

    def attention_options(self) -> AttentionOptions:
        return AttentionOptions(self.attention_impl, int(self.attention_chunk_size), bool(self.attention_interpret))

    def replace(self, **kw) -> "QwenVLConfig":
        return dataclasses.replace(self, **kw)


def skywork_vl_reward_7b(**run) -> QwenVLConfig:
    """Skywork-VL-Reward-7B = Qwen2.5-VL-7B-Instruct's shapes (scores only: no LM head)."""
    vision = QwenVisionConfig(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584)
    text = TextConfig(
        vocab_size=152064,
        hidden_size=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        intermediate_size=18944,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        max_position_embeddings=128000,
    )
    return QwenVLConfig(vision=vision, text=text, lm_head=False, **run)


# --- host-side index computations (numpy, from static grids) ------------------------------


def vision_positions(grids: Grids, merge: int) -> np.ndarray:
    """i32[N, 2]: (row, column) of every patch in the processor's order (2×2 merge blocks
    contiguous), repeated over each grid's t frames."""
    out = []
    for t, h, w in grids:
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hp = hh.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        wp = ww.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hp, wp], axis=-1), (t, 1)))
    return np.concatenate(out).astype(np.int32)


def window_index(grids: Grids, merge: int, window_size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(index i32[N / merge²], window segment id per patch i32[N]) as transformers'
    ``get_vision_window_index``: merge units reordered window-major (windows of
    ``window_size / patch_size / merge`` units a side, partial at the edges), and for each
    patch of the permuted sequence the number (from 1) of its window."""
    win = window_size // merge // patch_size
    index, seg, base, wid = [], [], 0, 0
    for t, h, w in grids:
        lh, lw = h // merge, w // merge
        idx = np.arange(t * lh * lw).reshape(t, lh, lw)
        ph, pw = -lh % win, -lw % win
        nh, nw = (lh + ph) // win, (lw + pw) // win
        padded = np.pad(idx, ((0, 0), (0, ph), (0, pw)), constant_values=-1)
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, win * win)
        for row in padded:
            real = row[row >= 0]
            if real.size:
                wid += 1
                index.append(real + base)
                seg.append(np.full(real.size * merge * merge, wid))
        base += t * lh * lw
    return np.concatenate(index).astype(np.int32), np.concatenate(seg).astype(np.int32)


def frame_segments(grids: Grids) -> np.ndarray:
    """i32[N]: the frame (from 1) of every patch, for the full-attention blocks."""
    sizes = [h * w for t, h, w in grids for _ in range(t)]
    return np.repeat(np.arange(1, len(sizes) + 1), sizes).astype(np.int32)


def rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    grids: Grids,
    image_token_id: int,
    merge: int,
) -> np.ndarray:
    """M-RoPE positions i32[3, B, T] as transformers' ``get_rope_index`` (images only).

    Over each row's real tokens (``attention_mask`` 1): a run of text continues 1D positions
    on all three rows; a run of image-pad tokens takes the next grid (in batch order) and
    gets ``(start, start + r, start + c)`` for merged patch (r, c), after which positions
    continue at ``start + max(h, w) / merge``. Padding positions are 0. A run whose length is
    not its grid's ``t·h·w / merge²`` is an error.
    """
    ids = np.asarray(input_ids)
    b, t = ids.shape
    mask = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    out = np.zeros((3, b, t), np.int64)
    it = iter(grids)
    for r in range(b):
        cols = np.nonzero(mask[r])[0]
        is_img = ids[r, cols] == image_token_id
        pos, i, rows = 0, 0, []
        while i < len(cols):
            j = i
            while j < len(cols) and is_img[j] == is_img[i]:
                j += 1
            n = j - i
            if not is_img[i]:
                rows.append(np.broadcast_to(np.arange(n) + pos, (3, n)))
                pos += n
            else:
                try:
                    gt, gh, gw = next(it)
                except StopIteration:
                    raise ValueError(
                        f"rope_index: row {r} has more image-pad runs than the {len(grids)} grids"
                    ) from None
                lh, lw = gh // merge, gw // merge
                if n != gt * lh * lw:
                    raise ValueError(
                        f"rope_index: row {r}: an image-pad run of {n} tokens for grid {(gt, gh, gw)}, "
                        f"which needs {gt * lh * lw}"
                    )
                tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(lh), np.arange(lw), indexing="ij")
                rows.append(np.stack([tt, hh, ww]).reshape(3, -1) + pos)
                pos += max(gh, gw) // merge
            i = j
        if rows:
            out[:, r, cols] = np.concatenate(rows, axis=1)
    if next(it, None) is not None:
        raise ValueError(f"rope_index: {len(grids)} grids but fewer image-pad runs in input_ids")
    return out.astype(np.int32)


# --- rotary tables ------------------------------------------------------------------------


def vision_rope_tables(pos_hw: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """pos_hw i32[N, 2] -> cos, sin f32[N, head_dim]: rows over the first quarter, columns
    over the second, repeated for the second half (HF's rotate-half layout)."""
    dim = head_dim // 2
    inv = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    f = pos_hw.astype(jnp.float32)[..., None] * inv  # [N, 2, dim/2]
    emb = jnp.concatenate([f[:, 0], f[:, 1], f[:, 0], f[:, 1]], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def mrope_tables(positions: jax.Array, head_dim: int, theta: float, section) -> tuple[jax.Array, jax.Array]:
    """positions i32[3, B, T] -> cos, sin f32[B, T, head_dim]: frequency j (of head_dim/2)
    takes its angle from position row ``k`` where j falls in the k-th ``section``."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [3, B, T, hd/2]
    row = np.repeat(np.arange(3), np.asarray(section))  # [hd/2]
    sel = jnp.moveaxis(freqs[row, ..., np.arange(len(row))], 0, -1)  # [B, T, hd/2]
    emb = jnp.concatenate([sel, sel], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


# --- vision modules -----------------------------------------------------------------------


class VisionAttention(nn.Module):
    cfg: QwenVisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attn: AttentionOptions = AttentionOptions()

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids):
        """x f[1, N, D]; cos/sin f32[1, N, hd]; segment_ids i32[1, N] -> f[1, N, D]."""
        c = self.cfg
        b, n, d = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = Linear(3 * d, ("vit_embed", "heads"), name="qkv", **kw)(x).reshape(b, n, 3, c.num_heads, c.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = apply_rope(q.astype(jnp.float32), cos, sin).astype(q.dtype)
        k = apply_rope(k.astype(jnp.float32), cos, sin).astype(k.dtype)
        out = attention(q, k, v, causal=False, segment_ids=segment_ids, opts=self.attn).reshape(b, n, d)
        return Linear(d, ("heads", "vit_embed"), name="proj", **kw)(out)


class VisionMLP(nn.Module):
    cfg: QwenVisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gate = Linear(c.intermediate_size, ("vit_embed", "mlp"), name="gate_proj", **kw)(x)
        up = Linear(c.intermediate_size, ("vit_embed", "mlp"), name="up_proj", **kw)(x)
        return Linear(c.hidden_size, ("mlp", "vit_embed"), name="down_proj", **kw)(jax.nn.silu(gate) * up)


class VisionBlock(nn.Module):
    cfg: QwenVisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attn: AttentionOptions = AttentionOptions()

    @nn.compact
    def __call__(self, x, full, cos, sin, seg_frame, seg_window):
        """x f[1, N, D]; full: bool[] (this block attends per frame, else per window)."""
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        seg = jnp.where(full, seg_frame, seg_window)
        h = RMSNorm(c.rms_norm_eps, names=("vit_embed",), name="norm1", **kw)(x)
        x = x + VisionAttention(c, attn=self.attn, name="attn", **kw)(h, cos, sin, seg)
        h = RMSNorm(c.rms_norm_eps, names=("vit_embed",), name="norm2", **kw)(x)
        x = x + VisionMLP(c, name="mlp", **kw)(h)
        return constrain(x, VIT_ACT), None


class PatchMerger(nn.Module):
    cfg: QwenVisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        """x f[N, D] (merge blocks contiguous) -> f[N / merge², out_hidden_size]."""
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = RMSNorm(c.rms_norm_eps, names=("vit_embed",), name="ln_q", **kw)(x)
        x = x.reshape(-1, c.hidden_size * c.merge_unit)
        x = gelu_exact(Linear(c.hidden_size * c.merge_unit, (None, "mlp"), name="fc1", **kw)(x))
        return Linear(c.out_hidden_size, ("mlp", "embed"), name="fc2", **kw)(x)


class QwenVisionEncoder(nn.Module):
    config: QwenVLConfig

    @nn.compact
    def __call__(self, pixel_values: jax.Array, grids: Grids) -> jax.Array:
        """pixel_values f[N, C·T·P·P] (the processor's flattened patches, images in order);
        grids: static ((t, h, w), ...) with N = Σ t·h·w -> f[N / merge², out_hidden_size]
        in the processor's order."""
        mc, c = self.config, self.config.vision
        kw = dict(dtype=jnp.dtype(mc.dtype), param_dtype=jnp.dtype(mc.param_dtype))
        n = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape != (n, c.patch_dim):
            raise ValueError(
                f"pixel_values: expected [{n}, {c.patch_dim}] for grids {list(grids)}, got {list(pixel_values.shape)}"
            )
        # Images of one grid run as a batch of sequences [images, n, D] (each image is its own
        # attention domain anyway); otherwise all patches form one sequence [1, N, D] with
        # segment ids per window / frame.
        same = len(grids) > 1 and len(set(grids)) == 1
        unit, rows = (grids[:1], len(grids)) if same else (grids, 1)
        index, seg_window = window_index(unit, c.spatial_merge_size, c.window_size, c.patch_size)
        perm = (index[:, None] * c.merge_unit + np.arange(c.merge_unit)[None]).reshape(-1)
        x = Linear(c.hidden_size, (None, "vit_embed"), use_bias=False, name="patch_embed", **kw)(pixel_values)
        x = x.reshape(rows, len(perm), c.hidden_size)[:, perm]
        cos, sin = vision_rope_tables(
            jnp.asarray(vision_positions(unit, c.spatial_merge_size)[perm]), c.head_dim, c.rope_theta
        )
        full = np.zeros(c.depth, bool)
        full[list(c.fullatt_block_indexes)] = True
        x, _ = LayerStack(
            VisionBlock,
            dict(cfg=c, attn=mc.attention_options(), **kw),
            num_layers=c.depth,
            scan=mc.scan_layers,
            remat=mc.remat_policy,
            broadcast_args=4,
            name="layers",
        )(
            constrain(x, VIT_ACT),
            jnp.asarray(full),
            cos[None],
            sin[None],
            jnp.broadcast_to(jnp.asarray(frame_segments(unit)[perm]), (rows, len(perm))),
            jnp.broadcast_to(jnp.asarray(seg_window), (rows, len(perm))),
        )
        merged = PatchMerger(c, name="merger", **kw)(x.reshape(-1, c.hidden_size))
        merged = merged.reshape(rows, len(index), c.out_hidden_size)[:, np.argsort(index)]
        return merged.reshape(-1, c.out_hidden_size)


class QwenVL(nn.Module):
    """Qwen2.5-VL: ``hidden`` (final-normed states) and ``__call__`` (logits)."""

    config: QwenVLConfig

    def setup(self):
        self.visual = QwenVisionEncoder(self.config)
        self.language_model = Qwen2(self.config)  # duck-typed: text, dtypes, scan, remat, attention_options

    def hidden(self, input_ids, pixel_values, grids: Grids, positions, attention_mask=None) -> jax.Array:
        """input_ids i32[B, T]; pixel_values f[N, patch_dim] or None (text only); grids static;
        positions i32[3, B, T] (:func:`rope_index`); attention_mask [B, T] (1 = real) or None
        -> final-normed f[B, T, H]. Image features replace the image-pad embeddings in order."""
        c = self.config
        embeds = self.language_model.embed(input_ids)
        if pixel_values is not None and grids:
            feats = self.visual(pixel_values, grids)
            embeds = merge_image_features(embeds, input_ids, feats, c.image_token_id)
        rope = mrope_tables(positions, c.text.resolved_head_dim, c.text.rope_theta, c.mrope_section)
        return self.language_model.decode(embeds, None, attention_mask, rope=rope)

    def __call__(self, input_ids, pixel_values, grids: Grids, positions, attention_mask=None) -> jax.Array:
        """-> logits f[B, T, V] (needs ``config.lm_head``)."""
        if not self.config.lm_head:
            raise ValueError("QwenVL: this config has no LM head (lm_head=False); use hidden()")
        return self.language_model.logits(self.hidden(input_ids, pixel_values, grids, positions, attention_mask))


def dummy_inputs(config: QwenVLConfig):
    """(input_ids, pixel_values, grids, positions) of one 28×28-pixel image for init."""
    c = config.vision
    side = 2 * c.spatial_merge_size
    grids = ((1, side, side),)
    n_pad = side * side // c.merge_unit
    ids = np.zeros((1, n_pad + 2), np.int32)
    ids[0, 1 : 1 + n_pad] = config.image_token_id
    pos = rope_index(ids, None, grids, config.image_token_id, c.spatial_merge_size)
    return jnp.asarray(ids), jnp.zeros((side * side, c.patch_dim), jnp.float32), grids, jnp.asarray(pos)


def init_qwen_vl_params(config: QwenVLConfig, rng: jax.Array) -> dict:
    """Random (unboxed) parameters: the vision tower, the decoder and (``lm_head``) its head."""
    method = QwenVL.__call__ if config.lm_head else QwenVL.hidden
    return nn.unbox(QwenVL(config).init(rng, *dummy_inputs(config), method=method)["params"])


def abstract_qwen_vl_params(config: QwenVLConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs (no memory)."""
    return jax.eval_shape(lambda: init_qwen_vl_params(config, jax.random.PRNGKey(0)))
