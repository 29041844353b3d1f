"""Chunked log-probs and entropies (r1v2_jax.train.logprobs) == the full-logit computation.

Tolerance (fixed): <= 1e-5 for the values and their gradients, float32.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import r1v2_jax
from r1v2_jax.model.config import model_config
from r1v2_jax.train.logprobs import chunked_logprobs, full_logprobs
from r1v2_jax.train.steps import next_token_logprobs

TOL = 1e-5


def _arrays(seed, b=2, n=45, h=24, v=97):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((b, n, h)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((h, v)) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, n)), jnp.int32)
    w1, w2 = (jnp.asarray(rng.standard_normal((b, n)), jnp.float32) for _ in range(2))
    return hidden, kernel, targets, w1, w2


@pytest.mark.parametrize("chunk", [8, 16, 45, 64])  # 8, 16 do not divide 45: the last chunk is padded
def test_chunked_equals_full_with_gradients(chunk):
    hidden, kernel, targets, w1, w2 = _arrays(0)

    def objective(fn):
        def f(h, k):
            lp, ent = fn(h, k)
            return (w1 * lp).sum() + (w2 * ent).sum(), (lp, ent)

        return f

    full = objective(lambda h, k: full_logprobs(jnp.einsum("bnh,hv->bnv", h, k), targets, with_entropy=True))
    chunked = objective(lambda h, k: chunked_logprobs(h, k, targets, chunk=chunk, with_entropy=True))
    (v_f, (lp_f, ent_f)), g_f = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(hidden, kernel)
    (v_c, (lp_c, ent_c)), g_c = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(hidden, kernel)
    np.testing.assert_allclose(np.asarray(lp_c), np.asarray(lp_f), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(ent_c), np.asarray(ent_f), atol=TOL, rtol=0)
    for name, a, b in zip(("hidden", "kernel"), g_c, g_f):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=0, err_msg=name)


def test_bfloat16_inputs_give_float32_logsumexp():
    """bf16 hidden states and head: the log-probs are those of float32 logits of the bf16 values
    (float32 accumulation, float32 logsumexp), not of bf16-rounded logits."""
    hidden, kernel, targets, _, _ = _arrays(1, v=4099)
    hb, kb = hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    lp, _ = chunked_logprobs(hb, kb, targets, chunk=16)
    exact, _ = full_logprobs(jnp.einsum("bnh,hv->bnv", hb.astype(jnp.float32), kb.astype(jnp.float32)), targets)
    rounded, _ = full_logprobs(jnp.einsum("bnh,hv->bnv", hb, kb), targets)  # bf16 logits
    assert lp.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lp), np.asarray(exact), atol=TOL, rtol=0)
    assert float(jnp.abs(rounded - exact).max()) > 10 * TOL  # the test can tell the two apart


def _model_batch(cfg, t=40):
    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(0, cfg.image_token_id - 1, (2, t)), jnp.int32)
    mask = np.ones((2, t), np.int32)
    mask[1, t - 7 :] = 0
    return ids, jnp.asarray(mask)


def test_learner_logprobs_equal_full_logits_and_never_build_them():
    """next_token_logprobs (what SFT / MPO / GRPO use) == log_softmax of the model's logits, with
    gradients; and the compiled gradient holds no [B, T-1, V] float32 array."""
    cfg = model_config("tiny").replace(logprob_chunk_size=8)
    model = r1v2_jax.init_model(cfg, seed=1)
    ids, mask = _model_batch(cfg)
    w = jnp.asarray(np.random.default_rng(3).standard_normal((2, ids.shape[1] - 1)), jnp.float32)

    def full(params):
        logits = model.module.apply({"params": params}, ids, None, mask)
        lp, ent = full_logprobs(logits[:, :-1], ids[:, 1:], with_entropy=True)
        return (w * lp * mask[:, 1:]).sum(), (lp, ent)

    def chunked(params):
        lp, ent = next_token_logprobs(model.module, params, ids, mask, with_entropy=True)
        return (w * lp * mask[:, 1:]).sum(), (lp, ent)

    (_, (lp_f, ent_f)), g_f = jax.value_and_grad(full, has_aux=True)(model.params)
    (_, (lp_c, ent_c)), g_c = jax.value_and_grad(chunked, has_aux=True)(model.params)
    np.testing.assert_allclose(np.asarray(lp_c), np.asarray(lp_f), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(ent_c), np.asarray(ent_f), atol=TOL, rtol=0)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_c)[0], jax.tree.leaves(g_f)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=0, err_msg=jax.tree_util.keystr(path))

    v, t = cfg.text.vocab_size, ids.shape[1]
    hlo_c = jax.jit(jax.grad(lambda p: chunked(p)[0])).lower(model.params).compile().as_text()
    hlo_f = jax.jit(jax.grad(lambda p: full(p)[0])).lower(model.params).compile().as_text()
    whole = re.compile(rf"f32\[2,({t}|{t - 1}),{v}\]")
    assert whole.search(hlo_f)  # the full computation does build them (so the check can fail)
    assert not whole.search(hlo_c)
