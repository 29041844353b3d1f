"""Decode steps with the layer loop unrolled over per-layer weights and per-layer KV buffers.

Why: inside the token loop, the scanned layer stack (``nn.scan`` over weights stacked on a
leading ``layers`` axis) makes XLA:CPU copy each layer's weights out of the stacked arrays at
every step (a ``dynamic-slice`` feeding each dot: the dot cannot read a slice in place), so a
decode step moves every weight twice, plus a copy of each layer's KV out of the stacked cache.
For a decode step, whose cost is reading the weights once, that halves the speed (measured:
``bench/decode_throughput.py``). Here the stacked weights are split once per parameter
object, outside the compiled token loop (:func:`split_layers`), the layers run unrolled, each
reading its own weight buffers, and each layer's KV cache is its own buffer ``[1, B, S, Hkv,
hd]`` updated in place. Training keeps the scan (its step reads each weight a few times per
token of a long batch, and the scan keeps compile time and memory flat).

The per-layer blocks are the model's own :class:`~r1v2_jax.model.qwen2.DecoderLayer` applied
to their slice of the parameters, so the arithmetic is the model's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1v2_jax.model.config import ModelConfig
from r1v2_jax.model.layers import Linear, RMSNorm
from r1v2_jax.model.qwen2 import DecoderLayer, cache_mask, rope_tables


def split_layers(params, config: ModelConfig) -> dict:
    """The language model's parameters in the decode layout: ``{"top": {embed_tokens, norm,
    lm_head}, "layers": [per-layer tree] * L}``, from either layout (scanned: slices of the
    stacked arrays, which jit materialises as separate buffers; unrolled: ``block_i``)."""
    lm = params["language_model"]
    stack = lm["layers"]
    n = config.text.num_layers
    if "block" in stack:
        layers = [jax.tree.map(lambda a, i=i: a[i], stack["block"]) for i in range(n)]
    else:
        layers = [stack[f"block_{i}"] for i in range(n)]
    return {"top": {k: v for k, v in lm.items() if k != "layers"}, "layers": layers}


def split_cache(cache) -> list:
    """Stacked (k, v), each [L, B, S, Hkv, hd] -> per-layer [(k_i, v_i)] each [1, B, S, Hkv, hd]."""
    k, v = cache
    return [(k[i : i + 1], v[i : i + 1]) for i in range(k.shape[0])]


def _layer_module(config: ModelConfig) -> DecoderLayer:
    return DecoderLayer(config.text, dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))


def embed(config: ModelConfig, top: dict, tokens: jax.Array) -> jax.Array:
    """tokens i32[B, T] -> f[B, T, H] (the embedding table's rows, in the compute dtype)."""
    return jnp.take(top["embed_tokens"]["embedding"], tokens, axis=0).astype(jnp.dtype(config.dtype))


def head(config: ModelConfig, top: dict, x: jax.Array) -> jax.Array:
    """Final RMSNorm and LM head: f[B, T, H] -> logits f[B, T, V] (the model's own modules)."""

    dt, pdt = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    c = config.text
    h = RMSNorm(c.rms_norm_eps, dtype=dt, param_dtype=pdt).apply({"params": top["norm"]}, x)
    return Linear(c.vocab_size, ("embed", "vocab"), use_bias=False, dtype=dt, param_dtype=pdt).apply(
        {"params": top["lm_head"]}, h
    )


def run_layers(config: ModelConfig, layers: list, x: jax.Array, positions: jax.Array, attend) -> tuple:
    """Every decoder layer on x f[B, T, H]. ``attend(i)`` gives layer i's (mask, cache,
    cache_index) as :class:`DecoderLayer` takes them; returns (x, [updated cache of each layer])."""
    c = config.text
    cos, sin = rope_tables(positions, c.resolved_head_dim, c.rope_theta)
    block = _layer_module(config)
    caches = []
    for i, lp in enumerate(layers):
        mask, cache, index = attend(i)
        (x, cache), _ = block.apply({"params": lp}, (x, cache), jnp.int32(0), cos, sin, mask, index)
        caches.append(cache)
    return x, caches


def decode_step(
    config: ModelConfig,
    dparams: dict,
    tokens: jax.Array,
    positions: jax.Array,
    kv_valid: jax.Array,
    caches: list,
    cache_index: jax.Array,
) -> tuple[jax.Array, list]:
    """One cached step, as :meth:`R1V2.decode_step` but unrolled: tokens, positions i32[B, 1];
    kv_valid bool[B, S] (including the slot written now); caches: per-layer [(k, v)] each
    f[1, B, S, Hkv, hd] -> (logits f[B, V], updated caches)."""
    mask = cache_mask(kv_valid, cache_index, tokens.shape[1])
    x = embed(config, dparams["top"], tokens)
    x, caches = run_layers(config, dparams["layers"], x, positions, lambda i: (mask, caches[i], cache_index))
    return head(config, dparams["top"], x)[:, -1], caches
