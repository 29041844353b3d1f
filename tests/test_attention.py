"""The attention entry point: chunked and splash (Pallas interpret mode) against the XLA reference.

Tolerances (fixed): one attention block <= 1e-5 (forward and gradients), the whole model <= 1e-4.
Only real (non-padding) query positions are compared where padding is present: padding
queries' outputs are unspecified (see r1v2_jax.model.attention) and never reach a real token.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import r1v2_jax
from r1v2_jax.model import attention as A
from r1v2_jax.model.config import ConfigError, model_config
from r1v2_jax.model.vlm import R1V2Model
from r1v2_jax.parallel.sharding import make_mesh, use_mesh_rules

BLOCK_TOL = 1e-5
E2E_TOL = 1e-4


def _qkv(seed, b, t, hq, hkv, d):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return f(b, t, hq, d), f(b, t, hkv, d), f(b, t, hkv, d), f(b, t, hq, d)


def _segments(kind, b, t):
    seg = np.ones((b, t), np.int32)
    if kind == "padded":  # left padding in row 0, right padding in row 1
        seg[0, : t // 5] = 0
        seg[1, t - t // 7 :] = 0
    elif kind == "packed":  # three sequences and a padded tail in row 1
        seg[1, t // 4 : t // 2] = 2
        seg[1, t // 2 :] = 3
        seg[1, t - 9 :] = 0
    return None if kind == "full" else jnp.asarray(seg)


def _loss(fn, w):
    return lambda q, k, v: (fn(q, k, v) * w).sum()


def _check(impl_fn, causal, seg, shapes, seed=0):
    q, k, v, w = _qkv(seed, *shapes)
    t = shapes[1]
    ref_fn = lambda q, k, v: A.reference_attention(q, k, v, A.structural_mask(t, t, causal, seg))  # noqa: E731
    np.testing.assert_allclose(np.asarray(impl_fn(q, k, v)), np.asarray(ref_fn(q, k, v)), atol=BLOCK_TOL, rtol=0)
    g_ref = jax.grad(_loss(ref_fn, w), argnums=(0, 1, 2))(q, k, v)
    g_new = jax.grad(_loss(impl_fn, w), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g_new, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=BLOCK_TOL, rtol=0, err_msg=f"d{name}")


# chunk 48 does not divide T = 200: the last KV chunk is padded
@pytest.mark.parametrize(
    "kind,causal,chunk",
    [("full", True, 64), ("padded", True, 48), ("packed", True, 64), ("full", False, 48), ("packed", False, 64)],
)
def test_chunked_equals_reference(kind, causal, chunk):
    b, t = 2, 200
    seg = _segments(kind, b, t)
    fn = lambda q, k, v: A.chunked_attention(
        q,
        k,
        v,
        jnp.zeros((b, t), jnp.int32) if seg is None else seg,  # noqa: E731
        causal=causal,
        chunk_size=chunk,
    )
    _check(fn, causal, seg, (b, t, 4, 2, 16))


@pytest.mark.parametrize("kind,causal", [("full", True), ("padded", True), ("packed", True), ("full", False)])
def test_splash_interpret_equals_reference(kind, causal):
    b, t = 2, 136  # padded to 256 inside; head dim 16 padded to 128
    seg = _segments(kind, b, t)
    fn = lambda q, k, v: A.splash_attention(
        q,
        k,
        v,
        jnp.zeros((b, t), jnp.int32) if seg is None else seg,  # noqa: E731
        causal=causal,
        interpret=True,
    )
    _check(fn, causal, seg, (b, t, 4, 2, 16), seed=1)


@pytest.mark.parametrize("hkv", [2, 1])  # 2 KV heads split over tensor=2; 1 KV head is repeated per query head
def test_splash_inside_shard_map(hkv):
    """Under a mesh the kernel runs in shard_map over the batch and tensor axes."""
    mesh = make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    b, t = 2, 128
    seg = _segments("packed", b, t)
    opts = A.AttentionOptions("splash", interpret=True)

    def fn(q, k, v):
        with use_mesh_rules(mesh):
            return A.attention(q, k, v, causal=True, segment_ids=seg, opts=opts)

    _check(jax.jit(fn), True, seg, (b, t, 4, hkv, 16), seed=2)


def test_auto_resolution():
    assert A.resolve_impl("auto", 128) == "xla"  # CPU, short
    assert A.resolve_impl("auto", A.AUTO_CHUNKED_MIN_LEN) == "chunked"
    assert A.resolve_impl("chunked", 8) == "chunked"
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
    mesh = make_mesh(1, 4, 1, devices=topo.devices)
    with use_mesh_rules(mesh):
        assert A.resolve_impl("auto", 128) == "splash"  # AOT for a TPU topology from this CPU host


def test_bad_impl_is_refused():
    with pytest.raises(ConfigError, match="attention_impl"):
        model_config("tiny").replace(attention_impl="flash")
    with pytest.raises(ConfigError, match="attention_chunk_size"):
        model_config("tiny").replace(attention_chunk_size=0)


def _tiny_batch(cfg, seed=0, b=2, t=40):
    rng = np.random.default_rng(seed)
    per_tile = cfg.tokens_per_tile()
    ids = rng.integers(0, cfg.image_token_id - 1, (b, t))
    ids[:, 3 : 3 + per_tile] = cfg.image_token_id
    mask = np.ones((b, t), np.int32)
    mask[0, :2] = 0  # left padding (before the image)
    mask[1, t - 6 :] = 0  # right padding
    pix = rng.standard_normal((b, 3, cfg.tile_size, cfg.tile_size)).astype(np.float32)
    return jnp.asarray(ids, jnp.int32), jnp.asarray(pix), jnp.asarray(mask)


@pytest.mark.parametrize("impl", ["chunked", "splash"])
def test_model_end_to_end_per_impl(impl):
    """Whole VLM (ViT bidirectional + decoder causal with padding): logits and gradients of a
    masked log-likelihood equal the reference implementation's."""
    base = model_config("tiny").replace(attention_impl="xla", attention_chunk_size=16)
    model = r1v2_jax.init_model(base, seed=3)
    other = R1V2Model(base.replace(attention_impl=impl, attention_interpret=True), model.params)
    ids, pix, mask = _tiny_batch(base)
    real = np.asarray(mask).astype(bool)

    def loss(module, params):
        logits = module.apply({"params": params}, ids, pix, mask)
        lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        tok = jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1)[..., 0]
        return -(tok * mask[:, 1:]).sum(), logits

    (l_ref, lg_ref), g_ref = jax.value_and_grad(loss, argnums=1, has_aux=True)(model.module, model.params)
    (l_new, lg_new), g_new = jax.value_and_grad(loss, argnums=1, has_aux=True)(other.module, model.params)
    np.testing.assert_allclose(np.asarray(lg_new)[real], np.asarray(lg_ref)[real], atol=E2E_TOL, rtol=0)
    np.testing.assert_allclose(float(l_new), float(l_ref), atol=E2E_TOL, rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_new)[0], jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), atol=E2E_TOL, rtol=0, err_msg=jax.tree_util.keystr(path)
        )
