"""Train steps: learning, exact micro-batching, non-finite skip, per-module freezing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1v2_jax.model.config import model_config
from r1v2_jax.model.vlm import R1V2, init_params
from r1v2_jax.rl.losses import PolicyLossConfig
from r1v2_jax.rl.mpo import MPOConfig
from r1v2_jax.train.state import OptimConfig, init_state, make_optimizer
from r1v2_jax.train.steps import accumulate, make_train_step, sft_loss


@pytest.fixture(scope="module")
def setup():
    cfg = model_config("tiny")
    return cfg, R1V2(cfg), init_params(cfg, jax.random.key(0))


def _sft_batch(cfg, n=4, t=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 200, (n, t)).astype(np.int32)
    mask = np.ones((n, t), bool)
    loss_mask = np.zeros((n, t), bool)
    loss_mask[:, 6:] = True
    ids[:, 6:] = (np.arange(6) * 7 % 200)[None]  # a fixed continuation to learn
    return {
        "response_ids": jnp.asarray(ids),
        "response_mask": jnp.asarray(mask),
        "response_loss_mask": jnp.asarray(loss_mask),
    }


def test_sft_learns_and_micro_batching_is_exact(setup):
    cfg, module, params = setup
    opt = make_optimizer(OptimConfig(lr=3e-3, trainable="all"), params)
    batch = _sft_batch(cfg)
    s1 = make_train_step("sft", module, opt, n_micro=1, donate=False)
    # Exact accumulation: the gradient of the whole-batch loss, whatever the split. (Compared
    # on gradients: Adam's first step, lr*g/(|g|+eps), amplifies float noise in tiny gradients.)
    g1, l1, _ = jax.jit(lambda p: accumulate(lambda q, mb: sft_loss(module, q, mb), p, batch, 1))(params)
    g2, l2, _ = jax.jit(lambda p: accumulate(lambda q, mb: sft_loss(module, q, mb), p, batch, 2))(params)
    np.testing.assert_allclose(float(l1.value), float(l2.value), rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-7), g1, g2)
    state = init_state(params, opt, 0)
    first = None
    for _ in range(30):
        state, m = s1(state, batch, None)
        first = first if first is not None else float(m["loss"])
    assert float(m["loss"]) < 0.3 * first and int(state.step) == 30


def test_nan_batch_is_skipped_and_counted(setup):
    cfg, module, params = setup
    opt = make_optimizer(OptimConfig(lr=1e-3, trainable="all"), params)
    step = make_train_step("grpo", module, opt, policy_cfg=PolicyLossConfig(), donate=False)
    n, t = 4, 10
    batch = {
        "tokens": jnp.ones((n, t), jnp.int32),
        "attention_mask": jnp.ones((n, t), bool),
        "completion_mask": jnp.ones((n, t), bool).at[:, :5].set(False),
        "old_logp": jnp.full((n, t), jnp.nan),
        "advantages": jnp.ones((n,)),
    }
    state = init_state(params, opt, 0)
    new, m = step(state, batch, None)
    assert not bool(m["step_ok"]) and int(new.skipped) == 1 and int(new.step) == 1
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), new.params, state.params)
    good = dict(batch, old_logp=jnp.full((n, t), -5.0))
    new2, m2 = step(new, good, None)
    assert bool(m2["step_ok"]) and int(new2.skipped) == 1


def test_adapter_only_training_freezes_the_towers(setup):
    cfg, module, params = setup
    opt = make_optimizer(OptimConfig(lr=1e-2, trainable="adapter"), params)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 200, (2, 10)), jnp.int32).at[:, 1:5].set(cfg.image_token_id)
    pix = jnp.asarray(np.random.default_rng(2).normal(size=(2, 1, 3, 56, 56)), jnp.float32)
    batch = {
        "response_ids": ids,
        "response_mask": jnp.ones((2, 10), bool),
        "response_loss_mask": jnp.ones((2, 10), bool).at[:, :5].set(False),
        "pixel_values": pix,
    }
    new, m_all = make_train_step("sft", module, opt, donate=False)(init_state(params, opt, 0), batch, None)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.params, params)
    assert all(jax.tree.leaves(changed["mlp1"]))
    assert not any(jax.tree.leaves(changed["language_model"])) and not any(jax.tree.leaves(changed["vision_model"]))
    # the frozen towers under stop_gradient: the same update, without their weight gradients
    new2, m_ad = make_train_step("sft", module, opt, donate=False, trainable="adapter")(
        init_state(params, opt, 0), batch, None
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7),
        new2.params,
        new.params,
    )
    assert float(m_all["loss"]) == float(m_ad["loss"]) and 0 < float(m_ad["grad_norm"]) < float(m_all["grad_norm"])


def _mpo_batch(rng, b=4, t=10, split=4):
    out = {}
    for name in ("chosen", "rejected"):
        out[f"{name}_ids"] = jnp.asarray(rng.integers(0, 200, (b, t)), jnp.int32)
        out[f"{name}_mask"] = jnp.ones((b, t), bool)
        out[f"{name}_loss_mask"] = jnp.ones((b, t), bool).at[:, :split].set(False)
    return out


def _batch_reward_mean(module, params, ref, b, beta):
    """mean of β(log π − log π_ref) over the batch's chosen and rejected responses, by hand."""
    rs = []
    for name in ("chosen", "rejected"):
        ids, m = b[f"{name}_ids"], b[f"{name}_loss_mask"][:, 1:]
        lp = [
            jnp.take_along_axis(
                jax.nn.log_softmax(module.apply({"params": p}, ids, None, b[f"{name}_mask"])[:, :-1]),
                ids[:, 1:, None],
                -1,
            )[..., 0]
            for p in (params, ref)
        ]
        rs.append(beta * ((lp[0] - lp[1]) * m).sum(axis=1))
    return float(jnp.concatenate(rs).mean())


def test_mpo_step_delta_is_the_running_mean_including_this_batch(setup):
    cfg, module, params = setup
    ref = init_params(cfg, jax.random.key(7))  # a reference unlike the policy: rewards != 0 at step 1
    opt = make_optimizer(OptimConfig(lr=1e-3, trainable="all"), params)
    rng = np.random.default_rng(3)
    b1, b2 = _mpo_batch(rng), _mpo_batch(rng)
    step = make_train_step("mpo", module, opt, mpo_cfg=MPOConfig(), n_micro=2, donate=False)
    state = init_state(params, opt, 0)
    x1 = _batch_reward_mean(module, params, ref, b1, 0.1)
    assert abs(x1) > 1e-3
    new, m = step(state, b1, ref)
    # atol: Δ = β (difference of two ~30-nat float32 sums) is good to ~β * 4 ulp(32) = 1e-6
    tol = {"rtol": 1e-5, "atol": 1e-6}
    # δ after one batch is its mean reward exactly (an EMA from 0 gave 1% of it), and the loss used it
    np.testing.assert_allclose(float(new.bco_delta), x1, **tol)
    np.testing.assert_allclose(float(m["bco_delta"]), x1, **tol)
    assert int(new.bco_count) == 1 and bool(m["step_ok"])
    x2 = _batch_reward_mean(module, new.params, ref, b2, 0.1)
    new2, m2 = step(new, b2, ref)
    np.testing.assert_allclose(float(new2.bco_delta), (x1 + x2) / 2, **tol)
    assert int(new2.bco_count) == 2
    # one micro-batch or two: the same δ and the same gradients (the NLL's token mean is the batch's)
    one = make_train_step("mpo", module, opt, mpo_cfg=MPOConfig(), n_micro=1, donate=False)
    new1, m1 = one(state, b1, ref)
    np.testing.assert_allclose(float(new1.bco_delta), float(new.bco_delta), **tol)
    np.testing.assert_allclose(float(m1["loss"]), float(m["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m["grad_norm"]), rtol=1e-5)


def test_mpo_nll_is_the_batch_token_mean_in_the_step(setup):
    """With only the generation term and unequal chosen lengths, the step's loss is the NLL
    summed over all chosen tokens of the batch / their number (InternVL's)."""
    cfg, module, params = setup
    opt = make_optimizer(OptimConfig(lr=1e-3, trainable="all"), params)
    b = _mpo_batch(np.random.default_rng(5), b=2, t=12)
    b["chosen_loss_mask"] = b["chosen_loss_mask"].at[0, :10].set(False)  # 2 vs 8 chosen tokens
    step = make_train_step("mpo", module, opt, mpo_cfg=MPOConfig(w_pref=0.0, w_quality=0.0), n_micro=2, donate=False)
    _, m = step(init_state(params, opt, 0), b, params)
    ids = b["chosen_ids"]
    lp = jnp.take_along_axis(
        jax.nn.log_softmax(module.apply({"params": params}, ids, None, b["chosen_mask"])[:, :-1]), ids[:, 1:, None], -1
    )[..., 0]
    mask = b["chosen_loss_mask"][:, 1:]
    assert int(mask.sum(axis=1)[0]) == 2 and int(mask.sum(axis=1)[1]) == 8
    np.testing.assert_allclose(float(m["loss"]), float(-(lp * mask).sum() / mask.sum()), rtol=1e-5)


def test_reward_model_step_trains_the_value_head(setup):
    from r1v2_jax.rewards.reward_model import RewardModel, init_reward_params

    cfg, _, _ = setup
    params = init_reward_params(cfg, jax.random.key(0))
    opt = make_optimizer(OptimConfig(lr=3e-3, trainable="adapter"), params, extra_trainable=("value_head",))
    step = make_train_step("rm", RewardModel(cfg), opt, donate=False)
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 200, (8, 6))
    pos, neg = ids.copy(), ids.copy()
    pos[:, -1], neg[:, -1] = 210, 230
    b = {
        "chosen_ids": jnp.asarray(pos, jnp.int32),
        "rejected_ids": jnp.asarray(neg, jnp.int32),
        "chosen_mask": jnp.ones((8, 6), bool),
        "rejected_mask": jnp.ones((8, 6), bool),
    }
    state = init_state(params, opt, 0)
    losses = []
    for _ in range(15):
        state, m = step(state, b, None)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] and float(m["bt_accuracy"]) == 1.0
    changed = jax.tree.map(lambda a, b_: bool(jnp.any(a != b_)), state.params, params)
    assert all(jax.tree.leaves(changed["value_head"]))
    # adapter-only: the towers stay frozen (and the adapter gets no gradient without images)
    assert not any(jax.tree.leaves(changed["backbone"]["language_model"]))
    assert not any(jax.tree.leaves(changed["backbone"]["vision_model"]))
