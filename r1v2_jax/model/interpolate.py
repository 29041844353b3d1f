"""PyTorch-exact bicubic resampling of position-embedding grids.

``jax.image.resize(method="bicubic")`` uses the Keys kernel with a = -0.5 and antialiasing;
PyTorch's ``F.interpolate(mode="bicubic", align_corners=False)`` (what InternViT calls) uses
a = -0.75, no antialiasing, and clamps out-of-range taps to the border. This module builds
that operator as two small [out, in] matrices, so resampling is two einsums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_A = np.float32(-0.75)  # PyTorch's cubic convolution coefficient


def _cc1(x):  # |x| <= 1
    return ((_A + 2) * x - (_A + 3)) * x * x + 1


def _cc2(x):  # 1 < |x| < 2
    return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The float32 [out_size, in_size] matrix of 1-D bicubic resampling, align_corners=False."""
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"bicubic_matrix: sizes must be positive, got in={in_size} out={out_size}")
    scale = np.float32(in_size) / np.float32(out_size)
    m = np.zeros((out_size, in_size), np.float32)
    for o in range(out_size):
        # PyTorch: area_pixel_compute_source_index(..., cubic=True): no clamping at 0.
        src = scale * (np.float32(o) + np.float32(0.5)) - np.float32(0.5)
        i0 = int(np.floor(src))
        t = np.float32(src - np.float32(i0))
        w = (_cc2(t + 1), _cc1(t), _cc1(np.float32(1) - t), _cc2(np.float32(2) - t))
        for k in range(4):
            m[o, min(max(i0 - 1 + k, 0), in_size - 1)] += w[k]
    return m


def resize_grid(grid: jax.Array, out_h: int, out_w: int) -> jax.Array:
    """Bicubic-resize a [H, W, D] grid to [out_h, out_w, D] exactly as PyTorch does (float32)."""
    h, w, _ = grid.shape
    if (h, w) == (out_h, out_w):
        return grid
    dtype = grid.dtype
    g = grid.astype(jnp.float32)
    mh = jnp.asarray(bicubic_matrix(h, out_h))
    mw = jnp.asarray(bicubic_matrix(w, out_w))
    hi = jax.lax.Precision.HIGHEST
    g = jnp.einsum("oh,hwd->owd", mh, g, precision=hi)
    g = jnp.einsum("pw,owd->opd", mw, g, precision=hi)
    return g.astype(dtype)
