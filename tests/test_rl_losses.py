"""Advantages, GRPO policy loss, aggregation and MPO: hand-computed values, gradients,
micro-batch exactness, and an independent NumPy implementation of MPO."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1v2_jax.rl.advantages import effective_share, group_advantages, nonzero_variance_groups, select_first
from r1v2_jax.rl.losses import PolicyLossConfig, aggregate, kl_penalty, policy_loss, token_entropy
from r1v2_jax.rl.mpo import MPOConfig, batch_reward_mean, bco_delta_update, dpo_config, implicit_rewards, mpo_loss

jax.config.update("jax_enable_x64", False)


# --- advantages ----------------------------------------------------------------------------


def test_grpo_advantages_hand_computed():
    r = jnp.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = np.asarray(group_advantages(r, 4, mode="grpo", std_ddof=1, eps=0.0))
    # group 1: mean 0.5, unbiased std sqrt(1/3) -> ±0.5/0.57735 = ±0.866025
    np.testing.assert_allclose(a[:4], [0.8660254, -0.8660254, -0.8660254, 0.8660254], rtol=1e-6)
    np.testing.assert_array_equal(a[4:], 0.0)  # all-equal rewards: exactly zero
    third = np.asarray(group_advantages(jnp.full(3, 0.1), 3, eps=1e-12))  # mean(0.1 x3) != 0.1 in float
    np.testing.assert_array_equal(third, 0.0)
    b = np.asarray(group_advantages(r, 4, mode="grpo", std_ddof=0, eps=0.0))
    np.testing.assert_allclose(b[:4], [1, -1, -1, 1], rtol=1e-6)  # biased std 0.5
    np.testing.assert_allclose(np.asarray(group_advantages(r, 4, mode="drgrpo"))[:4], [0.5, -0.5, -0.5, 0.5])
    # RLOO: r_i - mean(others): 1 - 1/3 = 0.6667, 0 - 2/3 = -0.6667
    np.testing.assert_allclose(
        np.asarray(group_advantages(r, 4, mode="rloo"))[:4], [2 / 3, -2 / 3, -2 / 3, 2 / 3], rtol=1e-6
    )
    v = 0.5 / (np.sqrt(1 / 3) + 1.0)  # eps enters the denominator
    np.testing.assert_allclose(np.asarray(group_advantages(r, 4, mode="grpo", eps=1.0))[:4], [v, -v, -v, v], rtol=1e-6)


def test_dynamic_sampling_filter_and_selection():
    r = jnp.array([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 3.0, 3.0])
    keep = np.asarray(nonzero_variance_groups(r, 2))
    np.testing.assert_array_equal(keep, [False, False, True, True, False, False, False, False])
    idx, valid = select_first(jnp.asarray(keep), 3)
    np.testing.assert_array_equal(np.asarray(idx)[:2], [2, 3])
    np.testing.assert_array_equal(np.asarray(valid), [True, True, False])
    assert float(effective_share(jnp.array([0.0, 1.0, -2.0, 0.0]))) == 0.5


# --- policy loss ---------------------------------------------------------------------------


def _loss(logp, old, adv, mask, **kw):
    cfg = PolicyLossConfig(**kw)
    return policy_loss(logp, old, adv, mask, cfg)


def test_policy_loss_hand_computed_and_clipping_gradient():
    old = jnp.zeros((2, 3))
    logp = jnp.log(jnp.array([[1.1, 1.5, 0.5], [0.9, 0.7, 1.0]]))
    adv = jnp.array([2.0, -1.0])
    mask = jnp.array([[1, 1, 1], [1, 1, 0]], jnp.float32)
    loss, m = _loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    # seq 0 (A=2): ratios 1.1 (in band), 1.5 (clipped to 1.28), 0.5 (unclipped side: min(0.5, 0.8)*A -> -A*0.5)
    #   per-token -A*min(r, clip(r)) = -2.2, -2.56, -1.0 -> mean -1.92
    # seq 1 (A=-1): ratios 0.9, 0.7 (clipped at 0.8 -> loss max(0.7, 0.8) = 0.8) -> 0.9, 0.8 -> mean 0.85
    np.testing.assert_allclose(float(loss.value), (-1.92 + 0.85) / 2, rtol=1e-6)
    assert float(loss.count) == 2.0
    np.testing.assert_allclose(float(m["clip_frac"]), 2 / 5, rtol=1e-6)
    g = jax.grad(lambda lp: _loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28)[0].value)(logp)
    g = np.asarray(g)
    # d/dlogp of -A*r = -A*r (r = exp(logp)); seq weight 1/(2 * n_tokens)
    np.testing.assert_allclose(g[0], [-2 * 1.1 / 6, 0.0, -2 * 0.5 / 6], rtol=1e-5)  # clipped token: exactly 0
    np.testing.assert_allclose(g[1], [0.9 / 4, 0.0, 0.0], rtol=1e-5)  # clipped and masked tokens: 0


def test_all_equal_rewards_give_zero_gradient():
    adv = group_advantages(jnp.array([1.0, 1.0, 1.0, 1.0]), 4)
    logp = jnp.array(np.random.default_rng(0).normal(size=(4, 5)), jnp.float32)
    g = jax.grad(lambda lp: _loss(lp, jnp.zeros((4, 5)), adv, jnp.ones((4, 5)))[0].value)(logp)
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_dual_clip_bounds_negative_advantage_loss():
    old = jnp.zeros((1, 2))
    logp = jnp.log(jnp.array([[5.0, 1.0]]))
    loss, m = _loss(logp, old, jnp.array([-1.0]), jnp.ones((1, 2)), dual_clip=3.0)
    np.testing.assert_allclose(float(loss.value), (3.0 + 1.0) / 2, rtol=1e-6)  # 5 capped at 3
    assert float(m["dual_clip_frac"]) == 0.5
    g = jax.grad(lambda lp: _loss(lp, old, jnp.array([-1.0]), jnp.ones((1, 2)), dual_clip=3.0)[0].value)(logp)
    assert float(g[0, 0]) == 0.0


def test_log_ratio_clamp():
    loss, m = _loss(
        jnp.array([[100.0]]),
        jnp.array([[0.0]]),
        jnp.array([-1.0]),
        jnp.ones((1, 1)),
        log_ratio_clamp=2.0,
        clip_high=1e9,
    )
    np.testing.assert_allclose(float(m["ratio_max"]), np.exp(2.0), rtol=1e-6)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_aggregation_hand_values_and_micro_batches_exact(agg):
    x = jnp.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 6.0, 0.0], [7.0, 8.0, 9.0]])
    mask = jnp.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]], jnp.float32)
    expected = {
        "seq-mean-token-mean": (2.0 + 4.0 + 5.5) / 3,
        "token-mean": 21.0 / 6,
        "seq-mean-token-sum": (6.0 + 4.0 + 11.0) / 3,  # the empty 4th sequence is not counted
        "seq-mean-token-sum-norm": (6.0 + 4.0 + 11.0) / 4 / 3,
    }[agg]
    whole = aggregate(x, mask, agg, norm_tokens=4)
    np.testing.assert_allclose(float(whole.value), expected, rtol=1e-6)
    parts = (
        aggregate(x[:1], mask[:1], agg, 4) + aggregate(x[1:3], mask[1:3], agg, 4) + aggregate(x[3:], mask[3:], agg, 4)
    )
    np.testing.assert_allclose(float(parts.value), float(whole.value), rtol=1e-7)


def test_micro_batched_gradients_equal_whole_batch():
    rng = np.random.default_rng(1)
    logp = jnp.asarray(rng.normal(size=(6, 7)) * 0.1, jnp.float32)
    old = jnp.asarray(rng.normal(size=(6, 7)) * 0.1, jnp.float32)
    adv = jnp.asarray(rng.normal(size=6), jnp.float32)
    mask = jnp.asarray(rng.random((6, 7)) > 0.3, jnp.float32)
    cfg = PolicyLossConfig(clip_high=0.28)
    whole_g = jax.grad(lambda lp: policy_loss(lp, old, adv, mask, cfg)[0].value)(logp)
    total = policy_loss(logp, old, adv, mask, cfg)[0].count
    acc = jnp.zeros_like(logp)
    for s in (slice(0, 2), slice(2, 5), slice(5, 6)):
        g = jax.grad(lambda lp: policy_loss(lp, old[s], adv[s], mask[s], cfg)[0].sum)(logp[s])
        acc = acc.at[s].set(g)
    np.testing.assert_allclose(np.asarray(acc / total), np.asarray(whole_g), rtol=1e-6, atol=1e-8)


def test_kl_estimators_hand_values():
    lp, ref = jnp.array([0.0, -1.0]), jnp.array([-0.5, -1.0])
    np.testing.assert_allclose(np.asarray(kl_penalty(lp, ref, "k1")), [0.5, 0.0])
    np.testing.assert_allclose(np.asarray(kl_penalty(lp, ref, "k2")), [0.125, 0.0])
    np.testing.assert_allclose(np.asarray(kl_penalty(lp, ref, "k3")), [np.exp(-0.5) + 0.5 - 1, 0.0], rtol=1e-6)
    # with the penalty on, loss = pg + coef * k3
    old = jnp.zeros((1, 2))
    loss, m = policy_loss(
        jnp.zeros((1, 2)),
        old,
        jnp.array([0.0]),
        jnp.ones((1, 2)),
        PolicyLossConfig(kl_coef=0.5),
        ref_logp=jnp.array([[-0.5, 0.0]]),
    )
    np.testing.assert_allclose(float(loss.value), 0.5 * (np.exp(-0.5) + 0.5 - 1) / 2, rtol=1e-6)


def test_kl_at_padding_cannot_make_the_loss_nan():
    """A padding position whose policy and reference log-probs differ by 90: exp(90) is inf in
    float32 and inf x 0 = NaN. Masked before the exp, it contributes exactly nothing."""
    logp = jnp.array([[-1.0, -2.0, 0.0]])
    ref = jnp.array([[-1.5, -2.0, 90.0]])  # third position is padding
    mask = jnp.array([[1, 1, 0]], jnp.float32)
    cfg = PolicyLossConfig(kl_coef=0.5)

    def f(lp):
        return policy_loss(lp, logp, jnp.array([0.0]), mask, cfg, ref_logp=ref)[0].value

    k3 = np.exp(-0.5) + 0.5 - 1  # x = ref - logp = -0.5 at the first token, 0 at the second
    np.testing.assert_allclose(float(f(logp)), 0.5 * k3 / 2, rtol=1e-6)
    g = np.asarray(jax.grad(f)(logp))
    assert np.all(np.isfinite(g)) and g[0, 2] == 0.0
    # d/dlogp of 0.5 * k3 / 2 with k3 = exp(x) - x - 1, x = ref - logp: 0.25 * (1 - exp(x))
    np.testing.assert_allclose(g[0, :2], [0.25 * (1 - np.exp(-0.5)), 0.0], rtol=1e-5, atol=1e-8)
    # the policy ratio at padding too: an old log-prob 100 away at a masked position
    loss, _ = policy_loss(
        logp, logp.at[0, 2].set(-100.0), jnp.array([1.0]), mask, PolicyLossConfig(log_ratio_clamp=1e9)
    )
    np.testing.assert_allclose(float(loss.value), -1.0, rtol=1e-6)


def test_k3_is_clamped_like_verl():
    lp, ref = jnp.array([0.0, 0.0, 0.0]), jnp.array([30.0, 2.5, -30.0])
    # x = ref - logp clamped to +-20; k3 = exp(x) - x - 1 capped at 10
    want = [10.0, min(np.exp(2.5) - 2.5 - 1, 10.0), np.exp(-20.0) + 20.0 - 1]
    want[2] = min(want[2], 10.0)
    np.testing.assert_allclose(np.asarray(kl_penalty(lp, ref, "k3")), want, rtol=1e-6)
    np.testing.assert_allclose(
        float(kl_penalty(lp[:1], jnp.array([1.0]), "k3", log_ratio_clamp=0.5, k3_max=100.0)[0]),
        np.exp(0.5) - 0.5 - 1,
        rtol=1e-6,
    )
    np.testing.assert_allclose(float(kl_penalty(lp[:1], jnp.array([3.0]), "k3", k3_max=2.0)[0]), 2.0)
    with pytest.raises(ValueError, match="kl_max"):
        PolicyLossConfig(kl_max=0.0)


def test_entropy_of_uniform():
    np.testing.assert_allclose(float(token_entropy(jnp.zeros(8))), np.log(8), rtol=1e-6)


# --- MPO -----------------------------------------------------------------------------------


def _np_logsig(x):
    return -np.logaddexp(0.0, -x)


def _np_mpo(pc, pr, rc, rr, ntok, delta, beta, wp, wq, wg):
    """The R1V2/InternVL MPO formulas written out independently, in float64: TRL's per-pair
    sigmoid and bco_pair losses averaged over pairs, plus one NLL token mean over all chosen
    tokens of the batch (InternVL's CrossEntropyLoss over the flattened chosen labels)."""
    dc, dr = beta * (pc - rc), beta * (pr - rr)
    pref = -_np_logsig(dc - dr)
    qual = -_np_logsig(dc - delta) - _np_logsig(-(dr - delta))
    return np.mean(wp * pref + wq * qual) + wg * (-pc.sum() / ntok.sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mpo_matches_numpy_and_finite_differences(seed):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (rng.normal(size=5) * 10 - 40 for _ in range(4))
    ntok = rng.integers(5, 50, 5).astype(np.float64)
    delta = 0.3
    cfg = MPOConfig()

    def f(pc_, pr_):
        return mpo_loss(
            pc_,
            pr_,
            jnp.asarray(rc, jnp.float32),
            jnp.asarray(rr, jnp.float32),
            jnp.asarray(ntok),
            jnp.float32(delta),
            cfg,
        )[0].value

    val = float(f(jnp.asarray(pc, jnp.float32), jnp.asarray(pr, jnp.float32)))
    ref = _np_mpo(pc, pr, rc, rr, ntok, delta, 0.1, 0.8, 0.2, 1.0)
    assert abs(val - ref) <= 1e-6 * max(1.0, abs(ref))
    # gradients vs central finite differences of the float64 NumPy formula
    g_pc, g_pr = jax.grad(f, argnums=(0, 1))(jnp.asarray(pc, jnp.float32), jnp.asarray(pr, jnp.float32))
    h = 1e-4
    for which, g in ((0, g_pc), (1, g_pr)):
        for i in range(5):
            e = np.zeros(5)
            e[i] = h
            args = [pc, pr]
            rest = (rc, rr, ntok, delta, 0.1, 0.8, 0.2, 1.0)
            plus = _np_mpo(*(a + e if j == which else a for j, a in enumerate(args)), *rest)
            minus = _np_mpo(*(a - e if j == which else a for j, a in enumerate(args)), *rest)
            np.testing.assert_allclose(float(g[i]), (plus - minus) / (2 * h), rtol=1e-4, atol=1e-7)


def test_plain_dpo_and_delta_carries_no_gradient():
    pc, pr = jnp.array([-10.0]), jnp.array([-12.0])
    rc, rr = jnp.array([-11.0]), jnp.array([-11.0])
    loss, m = mpo_loss(pc, pr, rc, rr, jnp.array([4.0]), jnp.float32(0.0), dpo_config(beta=0.5))
    np.testing.assert_allclose(float(loss.value), -_np_logsig(0.5 * 1 - 0.5 * (-1)), rtol=1e-6)
    assert float(m["reward_accuracy"]) == 1.0
    g = jax.grad(lambda d_: mpo_loss(pc, pr, rc, rr, jnp.array([4.0]), d_, MPOConfig())[0].value)(jnp.float32(0.2))
    assert float(g) == 0.0


def test_bco_delta_is_exact_from_the_first_batch():
    """TRL's RunningMoments (count starts at 1e-24): δ_t = mean of the batch means so far, the
    current batch included; the bias-corrected EMA gives the first batch's mean exactly too."""
    pc, pr = jnp.array([-10.0, -6.0]), jnp.array([-12.0, -8.0])
    rc, rr = jnp.array([-11.0, -10.0]), jnp.array([-11.0, -9.0])
    cfg = MPOConfig()
    x1 = float(batch_reward_mean(implicit_rewards(pc, rc, cfg), implicit_rewards(pr, rr, cfg)))
    np.testing.assert_allclose(x1, 0.1 * (1 + 4 - 1 + 1) / 4, rtol=1e-6)  # Δ: 0.1, 0.4, -0.1, 0.1 -> 0.125
    d, n = jnp.float32(0.0), jnp.int32(0)
    want = [0.125, (0.125 - 0.5) / 2, (0.125 - 0.5 + 0.3) / 3]
    for x, w in zip([x1, -0.5, 0.3], want):
        d, n = bco_delta_update(d, n, jnp.float32(x), cfg)
        np.testing.assert_allclose(float(d), w, rtol=1e-6)
    assert int(n) == 3
    ema = MPOConfig(delta_mode="ema", delta_decay=0.9)
    d, n = jnp.float32(0.0), jnp.int32(0)
    m, ds = 0.0, []
    for t, x in enumerate([0.125, -0.5, 0.3], start=1):
        m = 0.9 * m + 0.1 * x
        d, n = bco_delta_update(d, n, jnp.float32(x), ema)
        ds.append(float(d))
        np.testing.assert_allclose(float(d), m / (1 - 0.9**t), rtol=1e-5)
    np.testing.assert_allclose(ds[:2], [0.125, (0.9 * 0.0125 - 0.05) / 0.19], rtol=1e-5)  # 0.125, -0.2039474
    # the loss uses the δ it is given: at δ = 0.125 vs the EMA-from-zero 0.00125 the BCO term differs
    q = [
        float(mpo_loss(pc, pr, rc, rr, jnp.array([3.0, 3.0]), jnp.float32(v), cfg)[1]["quality_loss"])
        for v in (0.125, 0.00125)
    ]
    assert abs(q[0] - q[1]) > 1e-3


def test_mpo_nll_is_one_token_mean_over_the_batch():
    """Unequal lengths: chosen log-probs -10 over 2 tokens and -8 over 8. InternVL/TRL: 18/10 =
    1.8; the per-pair mean of token means (5 + 1)/2 = 3 is the option ``seq-mean``."""
    pc, ntok = jnp.array([-10.0, -8.0]), jnp.array([2, 8])
    z = jnp.zeros(2)
    gen_only = MPOConfig(w_pref=0.0, w_quality=0.0, w_gen=1.0)
    np.testing.assert_allclose(float(mpo_loss(pc, z, z, z, ntok, jnp.float32(0), gen_only)[0].value), 1.8, rtol=1e-6)
    seq = MPOConfig(w_pref=0.0, w_quality=0.0, w_gen=1.0, gen_norm="seq-mean")
    np.testing.assert_allclose(float(mpo_loss(pc, z, z, z, ntok, jnp.float32(0), seq)[0].value), 3.0, rtol=1e-6)
    # micro-batches given the whole batch's tokens per pair (5) add up to the whole-batch value
    parts = [
        mpo_loss(pc[i : i + 1], z[:1], z[:1], z[:1], ntok[i : i + 1], jnp.float32(0), gen_only, jnp.float32(5.0))[0]
        for i in range(2)
    ]
    np.testing.assert_allclose(float((parts[0] + parts[1]).value), 1.8, rtol=1e-6)
    with pytest.raises(ValueError, match="gen_norm"):
        MPOConfig(gen_norm="mean")
    with pytest.raises(ValueError, match="delta_mode"):
        MPOConfig(delta_mode="ewma")


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="aggregation"):
        PolicyLossConfig(aggregation="mean")
    with pytest.raises(ValueError, match="norm_tokens"):
        PolicyLossConfig(aggregation="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="advantage mode"):
        group_advantages(jnp.zeros(4), 2, mode="ppo")
    with pytest.raises(ValueError, match="not a multiple"):
        group_advantages(jnp.zeros(5), 2)
