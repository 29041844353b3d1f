"""The learner's view of a rollout (``grpo_batch``) against a hand-built rollout, and one
on-policy GRPO step from a real rollout: importance ratios exactly 1 and no clipping.

The trainer tests are differential (two meshes, killed vs not, ...): an off-by-one in the
batch's ``old_logp`` or masks would be shared by both sides. These are absolute."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1v2_jax.model.config import model_config
from r1v2_jax.model.vlm import R1V2, R1V2Model, init_params
from r1v2_jax.rl.advantages import group_advantages
from r1v2_jax.rl.losses import PolicyLossConfig
from r1v2_jax.sampling.sampler import Sampler, SamplingParams
from r1v2_jax.train.rollout import grpo_batch
from r1v2_jax.train.state import OptimConfig, init_state, make_optimizer
from r1v2_jax.train.steps import make_train_step


def _rollout(**kw):
    return types.SimpleNamespace(**{k: np.asarray(v) for k, v in kw.items()})


def test_grpo_batch_against_a_hand_built_rollout():
    # 2 prompts x group 2, prompt width 4 (left-padded), 3 new tokens; pad id 0, eos 9
    out = _rollout(
        tokens=[
            [0, 0, 11, 12, 21, 22, 9],  # prompt of 2, completion of 3 (eos counted)
            [0, 0, 11, 12, 9, 0, 0],  # same prompt, completion of 1 (eos), then padding
            [13, 14, 15, 16, 31, 9, 0],  # prompt of 4, completion of 2
            [13, 14, 15, 16, 41, 42, 43],
        ],  # completion of 3, unfinished
        logprobs=np.zeros((4, 3)),  # the sampling distribution's (at temperature != 1): not the learner's
        ref_logprobs=[[-0.1, -0.2, -0.3], [-0.4, 0, 0], [-0.5, -0.6, 0], [-0.7, -0.8, -0.9]],
        lengths=[3, 1, 2, 3],
        prompt_lengths=[2, 2, 4, 4],
    )
    pix = np.arange(2 * 1 * 3 * 2 * 2, dtype=np.float32).reshape(2, 1, 3, 2, 2)  # 2 prompts, 1 tile each
    b = grpo_batch(out, pix, group=2)
    np.testing.assert_array_equal(b["tokens"], out.tokens)
    assert b["tokens"].dtype == np.int32
    np.testing.assert_array_equal(
        b["attention_mask"],
        [[0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]],
    )
    np.testing.assert_array_equal(
        b["completion_mask"],
        [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1]],
    )
    # old_logp[t] is the log-prob of tokens[t] (the learner compares it with log p(tokens[t] | tokens[:t]),
    # i.e. next_token_logprobs[:, t - 1], through old_logp[:, 1:]), from the unmodified model
    np.testing.assert_allclose(
        b["old_logp"],
        [
            [0, 0, 0, 0, -0.1, -0.2, -0.3],
            [0, 0, 0, 0, -0.4, 0, 0],
            [0, 0, 0, 0, -0.5, -0.6, 0],
            [0, 0, 0, 0, -0.7, -0.8, -0.9],
        ],
    )
    assert b["old_logp"].dtype == np.float32
    # each prompt's tiles repeated for its group's rows, in row order
    np.testing.assert_array_equal(b["pixel_values"], pix[[0, 0, 1, 1]])
    assert "pixel_values" not in grpo_batch(out, None, group=2)


@pytest.mark.parametrize("image", [False, True])
def test_one_on_policy_grpo_step_has_ratios_of_one_and_no_clipping(image):
    """Sample with the policy at temperature 1, build the learner's batch, take one real GRPO
    step with the same parameters: every completion token's ratio π/π_old must be 1 (the
    sampler's cached decode and the learner's full forward agree to float32 rounding), so
    nothing is clipped. This is the rollout/learner mismatch TRL and vLLM users report."""
    cfg = model_config("tiny")
    params = init_params(cfg, jax.random.key(3))
    rng = np.random.default_rng(0)
    b, seq, group = 2, 12, 4
    ids = rng.integers(1, cfg.image_token_id - 1, (b, seq)).astype(np.int32)
    mask = np.ones((b, seq), bool)
    mask[1, :5] = False  # a shorter, left-padded prompt
    ids[1, :5] = 0
    pix = None
    if image:
        n = cfg.tokens_per_tile()  # one tile's <IMG_CONTEXT> slots after the (left) padding
        ids = np.concatenate([ids[:, :7], np.full((b, n), cfg.image_token_id, np.int32), ids[:, 7:]], axis=1)
        mask = np.concatenate([mask[:, :7], np.ones((b, n), bool), mask[:, 7:]], axis=1)
        pix = rng.standard_normal((b, 1, 3, cfg.tile_size, cfg.tile_size)).astype(np.float32)
    sampler = Sampler(R1V2Model(cfg, params))
    sp = SamplingParams(max_new_tokens=10, temperature=1.0, eos_ids=(7,), pad_id=0)
    out = sampler(ids, attention_mask=mask, pixel_values=pix, sp=sp, num_samples=group, seed=1).host_local()
    assert 0 < int(np.asarray(out.lengths).min())
    batch = {k: jnp.asarray(v) for k, v in grpo_batch(out, pix, group).items()}
    rewards = jnp.asarray(rng.random(b * group), jnp.float32)
    batch["advantages"] = group_advantages(rewards, group)
    opt = make_optimizer(OptimConfig(lr=1e-3, trainable="all"), params)
    step = make_train_step(
        "grpo", R1V2(cfg), opt, policy_cfg=PolicyLossConfig(clip_low=0.2, clip_high=0.28), donate=False
    )
    _, m = step(init_state(params, opt, 0), batch, None)
    assert bool(m["step_ok"])
    assert abs(float(m["ratio_max"]) - 1.0) <= 1e-5 and abs(float(m["ratio_min"]) - 1.0) <= 1e-5, (
        float(m["ratio_min"]),
        float(m["ratio_max"]),
    )
    assert float(m["clip_frac"]) == 0.0 and float(m["dual_clip_frac"]) == 0.0
    # on-policy, the clipped surrogate is -mean(A) per sequence; with seq-mean-token-mean, -mean(A) = 0
    np.testing.assert_allclose(float(m["pg_loss"]), -float(batch["advantages"].mean()), atol=1e-5)
