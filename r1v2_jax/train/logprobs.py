"""Per-token log-probs and entropies without a whole sequence's [T, V] float32 logits.

The learner needs ``log p(token_t | tokens_<t)`` (and for GRPO's metrics the entropy of each
predictive distribution) at every position of 12k-token sequences with a 152k vocabulary:
full logits would be 7.3 GB of float32 per sequence, and as much again for their gradient.

:func:`chunked_logprobs` runs the LM head over ``chunk`` positions at a time under a
``lax.scan`` whose body is **rematerialised** (``jax.checkpoint``): the forward keeps only
the per-token results, and the backward recomputes one chunk's logits at a time, so at most
one [B, chunk, V] float32 block (and its cotangent) exists, forward or backward. (A custom
VJP would save the same memory with one matmul less in the backward; the remat scan was
chosen because autodiff keeps it exact for every use, e.g. gradients through the entropy.)

The head matmul takes the compute dtype's inputs with float32 accumulation and output
(``preferred_element_type``), so bfloat16 models never round logits to bfloat16; logsumexp,
the target logit and the entropy are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1v2_jax.parallel.sharding import constrain


def chunked_logprobs(
    hidden: jax.Array,
    kernel: jax.Array,
    targets: jax.Array,
    *,
    chunk: int = 512,
    with_entropy: bool = False,
    dtype=None,
) -> tuple[jax.Array, jax.Array | None]:
    """hidden: f[B, N, H] (final-normed); kernel: f[H, V] (the LM head, no bias); targets:
    i32[B, N] -> (log p(targets) f32[B, N], entropy f32[B, N] or None). ``dtype``: the matmul's
    input dtype (default: hidden's)."""
    b, n, _ = hidden.shape
    dtype = hidden.dtype if dtype is None else dtype
    c = max(1, min(chunk, n))
    steps = -(-n // c)
    pad = steps * c - n
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    tgt = jnp.pad(targets.astype(jnp.int32), ((0, 0), (0, pad)))
    # All-gather the head's FSDP shards once, outside the loop (it stays split over the vocabulary).
    w = constrain(kernel, (None, "vocab")).astype(dtype)

    @jax.checkpoint
    def one_chunk(hc, tc):
        logits = jnp.einsum("bch,hv->bcv", hc.astype(dtype), w, preferred_element_type=jnp.float32)
        logits = constrain(logits, ("act_batch", "act_len", "act_vocab"))
        lse = jax.nn.logsumexp(logits, axis=-1)
        lp = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0] - lse
        if not with_entropy:
            return lp, None
        ent = lse - jnp.sum(jnp.exp(logits - lse[..., None]) * logits, axis=-1)
        return lp, ent

    def body(carry, x):
        return carry, one_chunk(*x)

    xs = (jnp.moveaxis(h.reshape(b, steps, c, -1), 1, 0), jnp.moveaxis(tgt.reshape(b, steps, c), 1, 0))
    _, (lp, ent) = jax.lax.scan(body, None, xs)

    def unchunk(a):
        return jnp.moveaxis(a, 0, 1).reshape(b, steps * c)[:, :n]

    return unchunk(lp), (unchunk(ent) if with_entropy else None)


def full_logprobs(logits: jax.Array, targets: jax.Array, with_entropy: bool = False):
    """The materialised computation (for tests and comparison): logits f[B, N, V] -> as above."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return lp, (-jnp.sum(jnp.exp(logp) * logp, axis=-1) if with_entropy else None)
