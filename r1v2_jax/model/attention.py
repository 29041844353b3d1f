"""One attention entry point for full sequences, three implementations.

:func:`attention` computes ``softmax(q kᵀ / √d + mask) v`` for grouped-query attention
(query head h reads KV head ``h // (Hq / Hkv)``, as HF's ``repeat_kv``) with the mask given
*structurally*: ``causal`` (key index <= query index) and optional ``segment_ids`` i32[B, T]
(a query sees a key only within its own segment; 0 is the padding segment by convention, so
a 0/1 attention mask is a valid segment-id array and packed rows use 1, 2, ...). Only a
structural mask lets the kernels skip work and never build a [T, S] mask; a dense boolean
mask (the KV-cache path of prefill/decode) goes to the XLA reference, whatever the impl.

Implementations (``ModelConfig.attention_impl``):

* ``xla``: the reference, the model's original einsum → float32 softmax → einsum. It
  materialises the [B, H, T, S] float32 scores. ``prescale=True`` reproduces InternViT's
  numerics (q scaled in its dtype before the product), ``False`` the Qwen2 decoder's (scores
  scaled in float32 after it).
* ``chunked``: online softmax (flash-attention recurrence) in plain XLA, a ``lax.scan`` over
  KV chunks of ``chunk_size``; the largest score block is [B, H, T, chunk]. Gradients come
  from a **custom VJP** that saves only the output and the per-row float32 logsumexp and
  recomputes each chunk's probabilities in a second scan (autodiff of the scan would save
  every chunk's probabilities, i.e. the whole T × S matrix again). Statistics and
  accumulators are float32; matmuls take the input dtype with float32 accumulation.
* ``splash``: ``jax.experimental.pallas.ops.tpu.splash_attention`` (causal or full mask plus
  segment ids, GQA native), inside ``shard_map`` over the mesh's batch axes (``act_batch``)
  and heads (``act_heads``) taken from the sharding rules in context; without a mesh it is
  called directly. T is padded to a multiple of 128 (padding is its own segment, -1) and the
  head dim to a multiple of 128 (zeros: q·k and the kept output columns are unchanged).
  ``interpret=True`` runs the kernel in Pallas interpret mode (CPU tests). When the KV heads
  cannot be split like the query heads over the tensor axis, K/V are repeated to one head per
  query head first.
* ``auto``: ``splash`` when the devices in use are TPUs (the mesh's devices, so an
  ahead-of-time compile for a TPU topology on a CPU host picks it too, else the default
  backend); elsewhere ``xla`` for sequences shorter than :data:`AUTO_CHUNKED_MIN_LEN` and
  ``chunked`` from there on.

Outputs at padding queries (segment 0) are unspecified: they attend within the padding
segment (never to real tokens), whereas the reference with a dense mask made them uniform.
Real tokens' outputs and all gradients that reach real tokens are the same.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa  # TPU kernel library, heavy
from jax.sharding import PartitionSpec as P

from r1v2_jax.parallel.sharding import current_mesh_rules, logical_to_pspec

IMPLS = ("auto", "xla", "chunked", "splash")
NEG_INF = float(jnp.finfo(jnp.float32).min)
AUTO_CHUNKED_MIN_LEN = 4096  # auto off TPU: the reference below this length, chunked from it
SPLASH_LANES = 128  # splash tiles T and the head dim in multiples of this


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """How attention over full sequences runs (from :class:`r1v2_jax.model.config.ModelConfig`)."""

    impl: str = "xla"
    chunk_size: int = 512
    interpret: bool = False

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"attention_impl: expected one of {IMPLS}, got {self.impl!r}")
        if self.chunk_size <= 0:
            raise ValueError(f"attention_chunk_size: must be > 0, got {self.chunk_size}")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["segment_ids"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SegmentMask:
    """The structural mask of a full sequence passed through the layer stack in place of a
    dense one: causal attention within ``segment_ids`` i32[B, T] (None: one segment)."""

    segment_ids: jax.Array | None


def resolve_impl(impl: str, seq_len: int) -> str:
    """The implementation ``auto`` stands for here (see the module docstring)."""
    if impl != "auto":
        return impl
    ctx = current_mesh_rules()
    platform = ctx[0].devices.flat[0].platform if ctx is not None else jax.default_backend()
    if platform == "tpu":
        return "splash"
    return "chunked" if seq_len >= AUTO_CHUNKED_MIN_LEN else "xla"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    opts: AttentionOptions = AttentionOptions(),
    prescale: bool = False,
) -> jax.Array:
    """q: f[B, T, Hq, d]; k, v: f[B, S, Hkv, d]; segment_ids: i32[B, T] (self-attention, S = T)
    or None (one segment); mask: bool[B, 1, 1, T, S] (broadcastable), exclusive with
    ``causal``/``segment_ids`` and always run by the reference -> f[B, T, Hq, d]."""
    if mask is not None:
        if segment_ids is not None or causal:
            raise ValueError("attention: a dense mask excludes causal=True and segment_ids")
        return reference_attention(q, k, v, mask, prescale=prescale)
    impl = resolve_impl(opts.impl, q.shape[1])
    if impl == "xla":
        return reference_attention(
            q, k, v, structural_mask(q.shape[1], k.shape[1], causal, segment_ids), prescale=prescale
        )
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"attention ({impl}): self-attention only (T = S), got T={q.shape[1]} S={k.shape[1]}")
    seg = jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    if impl == "chunked":
        return chunked_attention(q, k, v, seg, causal=causal, chunk_size=opts.chunk_size)
    return splash_attention(q, k, v, seg, causal=causal, interpret=opts.interpret)


def structural_mask(t: int, s: int, causal: bool, segment_ids: jax.Array | None) -> jax.Array | None:
    """bool[B or 1, 1, 1, T, S] for the reference (None: attend everywhere)."""
    allowed = None
    if causal:
        allowed = jnp.tril(jnp.ones((t, s), bool))[None]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        allowed = same if allowed is None else allowed & same
    return None if allowed is None else allowed[:, None, None]


def reference_attention(q, k, v, mask, *, prescale: bool = False) -> jax.Array:
    """The materialised XLA attention (the model's original code, moved unchanged)."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, t, hkv, hq // hkv, d)
    if prescale:
        logits = jnp.einsum("btkgd,bskd->bkgts", q * jnp.asarray(d**-0.5, q.dtype), k).astype(jnp.float32)
    else:
        logits = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) * (d**-0.5)
    if mask is not None:
        logits = jnp.where(mask, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, hq, d)


# --- chunked online softmax -------------------------------------------------------------


def chunked_attention(q, k, v, segment_ids, *, causal: bool, chunk_size: int = 512) -> jax.Array:
    """Flash-style attention in XLA: q f[B, T, Hq, d], k/v f[B, T, Hkv, d], segment_ids i32[B, T]."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    c = min(chunk_size, t)
    n = -(-t // c)
    pad = n * c - t
    kp, vp = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (k, v))
    segk = jnp.pad(segment_ids, ((0, 0), (0, pad)))
    out = _flash(q.reshape(b, t, hkv, hq // hkv, d), kp, vp, segment_ids, segk, causal, c, t)
    return out.reshape(b, t, hq, d)


def _chunk_allowed(seg_q, seg_kj, j, c, causal, s_real):
    """bool[B, 1, 1, T, C]: which keys of chunk j each query may see."""
    t = seg_q.shape[1]
    k_idx = j * c + jnp.arange(c)
    allowed = (seg_q[:, :, None] == seg_kj[:, None, :]) & (k_idx < s_real)[None, None, :]
    if causal:
        allowed = allowed & (k_idx[None, :] <= jnp.arange(t)[:, None])[None]
    return allowed[:, None, None]


def _chunks(a, c):
    """[B, n*c, ...] -> [n, B, c, ...]."""
    return jnp.moveaxis(a.reshape((a.shape[0], a.shape[1] // c, c) + a.shape[2:]), 1, 0)


def _scores(q, kj, scale):
    return jnp.einsum("btkgd,bckd->bkgtc", q, kj, preferred_element_type=jnp.float32) * scale


def _flash_fwd_impl(q, k, v, seg_q, seg_k, causal, c, s_real):
    b, t, hkv, g, d = q.shape
    scale = d**-0.5
    xs = (_chunks(k, c), _chunks(v, c), _chunks(seg_k, c), jnp.arange(k.shape[1] // c))

    def body(carry, x):
        o, m, l_ = carry
        kj, vj, sj, j = x
        allowed = _chunk_allowed(seg_q, sj, j, c, causal, s_real)
        s = jnp.where(allowed, _scores(q, kj, scale), NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l_ = l_ * corr + p.sum(axis=-1)
        pv = jnp.einsum("bkgtc,bckd->bkgtd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
        return (o * corr[..., None] + pv, m_new, l_), None

    init = (
        jnp.zeros((b, hkv, g, t, d), jnp.float32),
        jnp.full((b, hkv, g, t), NEG_INF, jnp.float32),
        jnp.zeros((b, hkv, g, t), jnp.float32),
    )
    (o, m, l_), _ = jax.lax.scan(body, init, xs)
    safe = jnp.where(l_ > 0, l_, 1.0)
    out = jnp.einsum("bkgtd->btkgd", o / safe[..., None]).astype(q.dtype)
    lse = jnp.where(l_ > 0, m + jnp.log(safe), 0.0)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, seg_q, seg_k, causal, c, s_real):
    return _flash_fwd_impl(q, k, v, seg_q, seg_k, causal, c, s_real)[0]


def _flash_fwd(q, k, v, seg_q, seg_k, causal, c, s_real):
    out, lse = _flash_fwd_impl(q, k, v, seg_q, seg_k, causal, c, s_real)
    return out, (q, k, v, seg_q, seg_k, out, lse)


def _flash_bwd(causal, c, s_real, res, dout):
    q, k, v, seg_q, seg_k, out, lse = res
    d = q.shape[-1]
    scale = d**-0.5
    do = dout.astype(jnp.float32)
    delta = jnp.einsum("btkgd,btkgd->bkgt", do, out.astype(jnp.float32))
    xs = (_chunks(k, c), _chunks(v, c), _chunks(seg_k, c), jnp.arange(k.shape[1] // c))

    def body(dq, x):
        kj, vj, sj, j = x
        allowed = _chunk_allowed(seg_q, sj, j, c, causal, s_real)
        p = jnp.where(allowed, jnp.exp(_scores(q, kj, scale) - lse[..., None]), 0.0)
        dv = jnp.einsum("bkgtc,btkgd->bckd", p, do)
        dp = jnp.einsum("btkgd,bckd->bkgtc", do, vj.astype(jnp.float32))
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bkgtc,bckd->btkgd", ds, kj.astype(jnp.float32))
        dk = jnp.einsum("bkgtc,btkgd->bckd", ds, q.astype(jnp.float32))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), xs)

    def unchunk(a, like):
        return jnp.moveaxis(a, 0, 1).reshape(like.shape).astype(like.dtype)

    return dq.astype(q.dtype), unchunk(dk, k), unchunk(dv, v), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --- splash (Pallas TPU kernel) -----------------------------------------------------------


def _largest_divisor(n: int, options: tuple[int, ...]) -> int:
    return next(o for o in options if n % o == 0)


def splash_block_sizes(t: int):
    """Block sizes for a (padded, multiple-of-128) sequence length ``t``, forward and backward."""

    bq = _largest_divisor(t, (512, 256, 128))
    bkv = _largest_divisor(t, (1024, 512, 256, 128))
    bkc = min(bkv, 512)
    return sa.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkc,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkc,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )


def _splash_local(q, k, v, seg, *, causal: bool, interpret: bool):
    """Per shard: q f[b, h, T, D] (already scaled), k/v f[b, hkv, T, D], seg i32[b, T]."""

    h, t = q.shape[1], q.shape[2]
    base = sa.CausalMask((t, t)) if causal else sa.FullMask((t, t))
    kern = sa.make_splash_mha(
        sa.MultiHeadMask([base] * h),
        block_sizes=splash_block_sizes(t),
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
    return jax.vmap(lambda q_, k_, v_, s_: kern(q_, k_, v_, segment_ids=sa.SegmentIds(q=s_, kv=s_)))(q, k, v, seg)


def splash_attention(q, k, v, segment_ids, *, causal: bool, interpret: bool = False) -> jax.Array:
    """Splash attention: q f[B, T, Hq, d], k/v f[B, T, Hkv, d], segment_ids i32[B, T] -> f[B, T, Hq, d]."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    tp = -(-t // SPLASH_LANES) * SPLASH_LANES
    dp = -(-d // SPLASH_LANES) * SPLASH_LANES
    scale = float(d**-0.5)  # a Python float: a numpy float would promote bf16 q to float32

    def prep(a):  # [B, T, H, d] -> [B, H, Tp, Dp]
        return jnp.pad(a, ((0, 0), (0, tp - t), (0, 0), (0, dp - d))).transpose(0, 2, 1, 3)

    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, tp - t)), constant_values=-1)
    ctx = current_mesh_rules()
    fn = functools.partial(_splash_local, causal=causal, interpret=interpret)
    if ctx is not None:
        mesh, rules = ctx
        q_spec = logical_to_pspec(("act_batch", "act_heads", None, None), rules, (b, hq, tp, dp), mesh)
        kv_spec = logical_to_pspec(("act_batch", "act_heads", None, None), rules, (b, hkv, tp, dp), mesh)
        if q_spec[1] != kv_spec[1]:  # KV heads do not split like the query heads: one KV head per query head
            k, v = (jnp.repeat(a, hq // hkv, axis=2) for a in (k, v))
            kv_spec = q_spec
        seg_spec = P(q_spec[0], None)
        fn = jax.shard_map(
            fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False
        )
    out = fn(prep(q) * jnp.asarray(scale, q.dtype), prep(k), prep(v), seg)
    return out.transpose(0, 2, 1, 3)[:, :t, :, :d]


def attention_flops(batch: int, seq: int, heads: int, head_dim: int, causal: bool, backward: bool) -> float:
    """Analytic matmul FLOPs of attention over ``seq`` tokens (for kernels cost_analysis omits):
    2 matmuls (q·k, p·v) of 2·T·S·d each per head, half of them under a causal mask; the
    backward adds 2.5× the forward (dq, dk, dv, dp, plus the recomputed scores)."""
    fwd = 4.0 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    return fwd * (3.5 if backward else 1.0)


__all__ = [
    "IMPLS",
    "AttentionOptions",
    "SegmentMask",
    "attention",
    "attention_flops",
    "chunked_attention",
    "reference_attention",
    "resolve_impl",
    "splash_attention",
    "splash_block_sizes",
    "structural_mask",
]
