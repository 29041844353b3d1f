"""Shared building blocks: linear, norms, remat policies, scan helper."""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from r1v2_jax.parallel.sharding import constrain

Dtype = jnp.dtype
Initializer = Callable[..., jax.Array]

default_kernel_init = nn.initializers.normal(stddev=0.02)


def param(
    module: nn.Module, name: str, init: Initializer, shape: Sequence[int], names: Sequence[str | None], dtype
) -> jax.Array:
    """Declare a parameter with its logical axis names (the one place that does).

    Under a mesh (``use_mesh_rules``) the value is also constrained to its sharding where it is
    used, inside scanned layers too: the per-layer weight and, by transposition, its gradient
    stay FSDP-sharded instead of being left to XLA's propagation (which kept whole stacks of
    layer gradients unsharded when the LLM trains)."""
    return constrain(
        module.param(name, nn.with_logical_partitioning(init, tuple(names)), tuple(shape), dtype), tuple(names)
    )


class Embed(nn.Module):
    """A token-embedding table ``[num_embeddings, features]`` (declared through :func:`param`, so
    it is constrained to its sharding where it is used like every other weight)."""

    num_embeddings: int
    features: int
    names: tuple[str | None, str | None] = ("vocab", "embed")
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    embedding_init: Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids: i32[...] -> f[..., features] (rows gathered, then cast: the same values as casting first)."""
        table = param(
            self, "embedding", self.embedding_init, (self.num_embeddings, self.features), self.names, self.param_dtype
        )
        return jnp.take(table, ids, axis=0).astype(self.dtype)


class Linear(nn.Module):
    """``y = x @ kernel + bias`` with kernel [in, out] (PyTorch's weight transposed)."""

    features: int
    names: tuple[str | None, str | None]
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = param(self, "kernel", self.kernel_init, (x.shape[-1], self.features), self.names, self.param_dtype)
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = param(self, "bias", nn.initializers.zeros, (self.features,), (self.names[1],), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """RMSNorm as in InternViT and Qwen2: statistics in float32, then ``scale * x.astype(dtype)``."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    names: tuple[str | None] = ("norm",)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), self.names, self.param_dtype)
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        return scale.astype(self.dtype) * y


class LayerNorm(nn.Module):
    """LayerNorm with scale and bias; statistics in float32."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    names: tuple[str | None] = ("norm",)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = param(self, "scale", nn.initializers.ones, (d,), self.names, self.param_dtype)
        bias = param(self, "bias", nn.initializers.zeros, (d,), self.names, self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU with the erf form (PyTorch's ``nn.GELU()`` default)."""
    return jax.nn.gelu(x, approximate=False)


# --- remat + scan ------------------------------------------------------------------------
# Names given to intermediate values with checkpoint_name, for the "save_qkv_attn" policy.
CKPT_QKV = "qkv_proj"
CKPT_ATTN_OUT = "attn_out"


def remat_policy(name: str):
    """The jax.checkpoint policy behind a config's ``remat_policy`` name.

    ``full``: save nothing, recompute the whole layer in the backward pass (least memory).
    ``dots``: keep matmul outputs without batch dimensions (the usual LLM trade-off).
    ``save_qkv_attn``: keep only the q/k/v projections and the attention output.
    """
    cp = jax.checkpoint_policies
    if name == "full":
        return cp.nothing_saveable
    if name == "dots":
        return cp.dots_with_no_batch_dims_saveable
    if name == "save_qkv_attn":
        return cp.save_only_these_names(CKPT_QKV, CKPT_ATTN_OUT)
    raise ValueError(f"remat_policy: unknown policy {name!r}")


class LayerStack(nn.Module):
    """A tower's layers: ``LayerStack(...)(x, per_layer, *broadcast) -> (x, ys)``.

    With ``scan=True`` the layers run under one ``nn.scan`` over a stacked parameter tree
    (``block/...`` with a leading axis named ``layers``); otherwise as ``block_0 ...
    block_{L-1}``. ``block`` modules have the signature ``block(x, per_layer, *broadcast) ->
    (x, y)``: ``per_layer`` is a pytree whose leaves have a leading ``num_layers`` axis
    (row i goes to layer i; None for nothing), and the per-layer outputs ``y`` come back
    stacked the same way as ``ys`` (e.g. a KV cache in, the updated cache out). ``remat``
    names a policy of :func:`remat_policy` (``"none"``: no remat).
    """

    block: type[nn.Module]
    block_kwargs: dict
    num_layers: int
    scan: bool
    remat: str
    broadcast_args: int

    @nn.compact
    def __call__(self, x, per_layer, *args):
        cls = self.block
        if self.remat != "none":
            cls = nn.remat(cls, policy=remat_policy(self.remat), prevent_cse=not self.scan)
        if self.scan:
            scanned = nn.scan(
                cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0,) + (nn.broadcast,) * self.broadcast_args,
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            return scanned(name="block", **self.block_kwargs)(x, per_layer, *args)
        ys = []
        for i in range(self.num_layers):
            row = jax.tree.map(lambda a: a[i], per_layer)
            x, y = cls(name=f"block_{i}", **self.block_kwargs)(x, row, *args)
            ys.append(y)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys and ys[0] is not None else None
