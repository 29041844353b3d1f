"""Packing several sequences per row: segment ids, positions restarting per sequence, attention
confined to the segment, and the SFT, MPO and RM losses and their gradients equal to the
unpacked batch's (<= 1e-5)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import r1v2_jax
from r1v2_jax.data.pipeline import PipelineConfig, collate_packed, collate_sequences, pack_rows
from r1v2_jax.model.config import model_config
from r1v2_jax.rewards.reward_model import RewardModel, init_reward_params
from r1v2_jax.rl.mpo import MPOConfig
from r1v2_jax.train.program import BATCH_LAYOUTS, PACKED_PAIR_KEYS
from r1v2_jax.train.run import per_row_tiles
from r1v2_jax.train.state import init_state
from r1v2_jax.train.steps import make_train_step, rm_loss, sft_loss

TOL = 1e-5


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([5, 3, 8, 2, 6, 1], 10)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum([5, 3, 8, 2, 6, 1][i] for i in r) <= 10 for r in rows) and len(rows) == 3
    with pytest.raises(ValueError, match="pack_length"):
        pack_rows([11], 10)


def _examples(cfg, seed=0, n=5):
    """SFT examples as PrepareSequences makes them: one image (1 or 2 tiles) + prompt + response."""
    rng = np.random.default_rng(seed)
    per_tile = cfg.tokens_per_tile()
    out = []
    for i in range(n):
        tiles = 1 + i % 2
        prompt = (
            [int(x) for x in rng.integers(0, cfg.image_token_id - 1, 3)]
            + [cfg.image_token_id] * (tiles * per_tile)
            + [int(x) for x in rng.integers(0, cfg.image_token_id - 1, 2 + i)]
        )
        resp = [int(x) for x in rng.integers(0, cfg.image_token_id - 1, 3 + 2 * i)]
        ids = np.asarray(prompt + resp, np.int32)
        mask = np.asarray([0] * len(prompt) + [1] * len(resp), bool)
        pix = rng.standard_normal((tiles, 3, cfg.tile_size, cfg.tile_size)).astype(np.float32)
        out.append({"pixel_values": pix, "where": f"ex{i}", "pad": False, "response": (ids, mask, False)})
    return out


def test_packed_sft_loss_and_gradients_equal_unpacked():
    cfg = model_config("tiny").replace(attention_impl="chunked", attention_chunk_size=16)
    model = r1v2_jax.init_model(cfg, seed=4)
    ex = _examples(cfg)
    pipe = PipelineConfig(batch_size=len(ex), length_buckets=(64,), tiles_bucket=1, pack_length=96)
    plain = collate_sequences(ex, pipe, cfg.tile_size, ("response",))
    packed = collate_packed(ex, pipe, cfg.tile_size, ("response",))
    assert packed["response_ids"].shape[0] < plain["response_ids"].shape[0]  # fewer rows
    seg, pos = packed["response_mask"], packed["response_positions"]
    assert seg.max() >= 2 and (pos[seg == 0] == 0).all()
    starts = (seg > 0) & (np.diff(seg, axis=1, prepend=-1) != 0)  # positions restart at 0 per sequence
    assert (pos[starts] == 0).all() and ((pos[:, 1:] == pos[:, :-1] + 1) | starts[:, 1:] | (seg[:, 1:] == 0)).all()
    assert packed["response_loss_mask"].sum() == plain["response_loss_mask"].sum()

    def batch(b):
        keys = ("response_ids", "response_mask", "response_loss_mask", "response_positions")
        out = {k: jnp.asarray(b[k]) for k in keys if k in b}
        out["pixel_values"] = jnp.asarray(per_row_tiles(b, 8))
        return out

    def loss(params, b):
        ls, _ = sft_loss(model.module, params, b)
        return ls.value

    l_plain, g_plain = jax.value_and_grad(loss)(model.params, batch(plain))
    l_packed, g_packed = jax.value_and_grad(loss)(model.params, batch(packed))
    np.testing.assert_allclose(float(l_packed), float(l_plain), atol=TOL, rtol=0)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_packed)[0], jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_packed_without_segments_would_differ():
    """The check above can fail: dropping the segment ids (one causal segment per row) changes the loss."""
    cfg = model_config("tiny").replace(attention_impl="xla")
    model = r1v2_jax.init_model(cfg, seed=4)
    ex = _examples(cfg)
    pipe = PipelineConfig(batch_size=len(ex), length_buckets=(64,), tiles_bucket=1, pack_length=96)
    packed = collate_packed(ex, pipe, cfg.tile_size, ("response",))
    b = {
        k: jnp.asarray(packed[k]) for k in ("response_ids", "response_mask", "response_loss_mask", "response_positions")
    }
    b["pixel_values"] = jnp.asarray(per_row_tiles(packed, 8))
    merged = dict(b, response_mask=(b["response_mask"] > 0).astype(jnp.int32))
    a, c = (float(sft_loss(model.module, model.params, x)[0].value) for x in (b, merged))
    assert abs(a - c) > 10 * TOL  # far outside the tolerance the equality test uses


def _pairs(cfg, seed=1, n=6):
    """Preference examples as PrepareSequences makes them: one image, a prompt, and a chosen and
    a rejected response of different lengths (each sequence: prompt + response)."""
    rng = np.random.default_rng(seed)
    per_tile = cfg.tokens_per_tile()
    tok = lambda k: [int(x) for x in rng.integers(0, cfg.image_token_id - 1, k)]  # noqa: E731
    out = []
    for i in range(n):
        prompt = tok(2) + [cfg.image_token_id] * per_tile + tok(1 + i % 3)
        ex = {"pixel_values": rng.standard_normal((1, 3, cfg.tile_size, cfg.tile_size)).astype(np.float32)}
        for name, k in (("chosen", 2 + i), ("rejected", 6 - i % 4)):
            resp = tok(k)
            ex[name] = (np.asarray(prompt + resp, np.int32), np.asarray([0] * len(prompt) + [1] * k, bool), False)
        out.append(dict(ex, where=f"pair{i}", pad=False))
    return out


def _pair_batches(cfg, ex):
    pipe = PipelineConfig(batch_size=len(ex), length_buckets=(48,), tiles_bucket=1, pack_length=96)
    plain = collate_sequences(ex, pipe, cfg.tile_size, ("chosen", "rejected"))
    packed = collate_packed(ex, dataclasses.replace(pipe, pack_rows_multiple=2), cfg.tile_size, ("chosen", "rejected"))
    keys = [k for k, _ in BATCH_LAYOUTS["mpo"]]
    a = {k: jnp.asarray(plain[k]) for k in keys} | {"pixel_values": jnp.asarray(per_row_tiles(plain, 1))}
    b = {k: jnp.asarray(packed[k]) for k in PACKED_PAIR_KEYS} | {"pixel_values": jnp.asarray(per_row_tiles(packed, 8))}
    return a, b, packed


def test_packed_mpo_step_equals_unpacked():
    """Six pairs in fewer packed rows (both sequences of a pair side by side, pairs summed into
    their row slots): one MPO step with 2 micro-batches gives the unpacked step's loss, BCO
    delta, gradient norm and gradients (<= 1e-5)."""
    cfg = model_config("tiny").replace(attention_impl="chunked", attention_chunk_size=16)
    model = r1v2_jax.init_model(cfg, seed=4)
    ex = _pairs(cfg)
    a, b, packed = _pair_batches(cfg, ex)
    assert b["packed_ids"].shape[0] < a["chosen_ids"].shape[0] and packed["packed_valid"].sum() == len(ex)
    opt = optax.sgd(1.0)  # new parameters = old - gradients: the step's gradients compared directly
    step = make_train_step("mpo", model.module, opt, mpo_cfg=MPOConfig(), n_micro=2, donate=False)
    ref = jax.tree.map(lambda x: x * 0.99, model.params)  # a reference unlike the policy: rewards nonzero
    outs = [step(init_state(model.params, opt, 0), x, ref) for x in (a, b)]
    (sa, ma), (sb, mb) = outs
    assert abs(float(ma["reward_margin"])) > 0 and float(ma["grad_norm"]) > 0  # not a comparison of zeros
    for k in ("loss", "grad_norm"):
        np.testing.assert_allclose(float(mb[k]), float(ma[k]), atol=TOL, rtol=0, err_msg=k)
    np.testing.assert_allclose(float(sb.bco_delta), float(sa.bco_delta), atol=TOL, rtol=0)
    # plain SGD with lr 1: the parameters moved by exactly the gradients
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(sb.params)[0], jax.tree.leaves(sa.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=TOL, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_packed_rm_loss_and_gradients_equal_unpacked():
    """The reward model on packed pairs (each sequence's score at its segment's last token):
    Bradley-Terry loss and gradients equal the unpacked batch's (<= 1e-5)."""
    cfg = model_config("tiny").replace(attention_impl="chunked", attention_chunk_size=16)
    module = RewardModel(cfg)
    params = init_reward_params(cfg, jax.random.key(2))
    a, b, _ = _pair_batches(cfg, _pairs(cfg, seed=3))

    def loss(p, x):
        return rm_loss(module, p, x)[0].value

    la, ga = jax.value_and_grad(loss)(params, a)
    lb, gb = jax.value_and_grad(loss)(params, b)
    np.testing.assert_allclose(float(lb), float(la), atol=TOL, rtol=0)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(gb)[0], jax.tree.leaves(ga)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=TOL, rtol=0, err_msg=jax.tree_util.keystr(path))
