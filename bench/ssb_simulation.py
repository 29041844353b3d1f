#!/usr/bin/env python3
"""Selective Sample Buffer simulation: effective-sample share per batch with and without SSB.

A synthetic stream of GRPO rollouts: each step samples P prompts x G responses with a binary
correctness reward; the policy's skill rises over training, so more and more groups come out
all-correct (zero advantage, no gradient), as the R1V2 paper describes. The same stream is
fed to a batch without SSB and to a batch mixed by the SSB (jitted ``ssb_add`` + ``ssb_mix``).

    python bench/ssb_simulation.py [--steps 60] [--prompts 32] [--group 8] [--target 0.65]
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from r1v2_jax.rl.advantages import group_advantages
from r1v2_jax.rl.ssb import SSBConfig, ssb_add, ssb_init, ssb_mix


def rollout_rewards(rng, step, steps, prompts, group):
    """Binary rewards f32[prompts*group]: P(correct) = sigmoid(6 (skill - difficulty))."""
    skill = 0.5 + 0.7 * step / max(steps - 1, 1)
    difficulty = rng.uniform(0, 1, prompts)
    p = 1 / (1 + np.exp(-6 * (skill - difficulty)))
    return (rng.uniform(size=(prompts, group)) < p[:, None]).astype(np.float32).reshape(-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--capacity", type=int, default=512)
    ap.add_argument("--target", type=float, default=0.65)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    cfg = SSBConfig(capacity=a.capacity, target_share=a.target, reuse_limit=4, max_age=16)
    n = a.prompts * a.group
    add = jax.jit(functools.partial(ssb_add, cfg=cfg))
    mix = jax.jit(functools.partial(ssb_mix, cfg=cfg))
    state = ssb_init(a.capacity, {"id": jnp.zeros((n,), jnp.int32)})
    rng, key = np.random.default_rng(a.seed), jax.random.key(a.seed)
    rows = []
    for step in range(a.steps):
        r = rollout_rewards(rng, step, a.steps, a.prompts, a.group)
        adv = group_advantages(jnp.asarray(r), a.group)
        payload = {"id": jnp.arange(step * n, (step + 1) * n, dtype=jnp.int32)}
        key, k = jax.random.split(key)
        # Mix with what earlier steps left in the buffer, then store this step's informative samples.
        _, _, state, m = mix(state, payload, adv, k)
        state, ma = add(state, payload, adv, jnp.asarray(r))
        groups = r.reshape(a.prompts, a.group)
        rows.append(
            dict(
                step=step,
                all_correct=float((groups.min(1) == 1).mean()),
                all_wrong=float((groups.max(1) == 0).mean()),
                without=float(m["effective_share_before"]),
                with_ssb=float(m["effective_share_after"]),
                fill=float(ma["ssb_fill"]),
                age=float(ma["ssb_mean_age"]),
            )
        )
    print(
        f"\nSSB simulation: {a.steps} steps x {a.prompts} prompts x G={a.group}, capacity {a.capacity}, "
        f"target share {a.target}, reuse limit {cfg.reuse_limit}, max age {cfg.max_age}"
    )
    print(
        f"{'step':>4} | {'all-correct groups':>18} | {'all-wrong':>9} | {'effective w/o SSB':>17} | "
        f"{'effective with SSB':>18} | {'buffer fill':>11} | {'mean age':>8}"
    )
    print("-" * 104)
    for row in rows[:: max(1, a.steps // 12)] + [rows[-1]]:
        print(
            f"{row['step']:>4} | {row['all_correct']:18.0%} | {row['all_wrong']:9.0%} | {row['without']:17.0%} | "
            f"{row['with_ssb']:18.0%} | {row['fill']:11.0%} | {row['age']:8.1f}"
        )
    late = rows[2 * len(rows) // 3 :]
    wo = np.mean([x["without"] for x in late])
    w = np.mean([x["with_ssb"] for x in late])
    print(
        f"\nlast third of training: effective share {wo:.0%} without SSB, {w:.0%} with SSB "
        f"(ratio {w / max(wo, 1e-9):.2f}); first step without SSB: {rows[0]['without']:.0%}"
    )


if __name__ == "__main__":
    main()
