#!/usr/bin/env python3
"""The GRPO train step (forward + backward + AdamW) for the `small` preset: achieved FLOP/s as
a share of this machine's measured matmul peak, and its time against the same step in
PyTorch on the same weights, measured side by side in one run.

    python bench/grpo_step_flops.py [--batch 8] [--seq 256]

FLOPs are counted analytically (training = 3 x forward; forward = 2 x matmul parameters x
tokens + attention 4 x T² x heads x head_dim per layer and sequence; the embedding lookup is
free), text-only sequences, full-precision float32 on CPU.
"""

import argparse
import os
import time

import numpy as np


def matmul_peak(n=2048, reps=5) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(reps))
    return 2 * n**3 / best


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def step_flops(cfg, batch, seq) -> float:
    t = cfg.text
    hd = t.resolved_head_dim
    per_layer = (
        t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * hd
        + t.num_heads * hd * t.hidden_size
        + 3 * t.hidden_size * t.intermediate_size
    )
    matmul_params = t.num_layers * per_layer + t.hidden_size * t.vocab_size  # + lm_head
    fwd = 2 * matmul_params * batch * seq + t.num_layers * batch * 4 * seq * seq * t.num_heads * hd
    return 3 * fwd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    import r1v2_jax
    from r1v2_jax.model.vlm import R1V2
    from r1v2_jax.rl.losses import PolicyLossConfig
    from r1v2_jax.train.state import OptimConfig, init_state, make_optimizer
    from r1v2_jax.train.steps import make_train_step

    torch.set_num_threads(os.cpu_count())
    model = r1v2_jax.init_model("small", seed=0)
    cfg = model.config
    n, t = a.batch, a.seq
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 150000, (n, t)).astype(np.int32)
    comp = np.zeros((n, t), bool)
    comp[:, t // 2 :] = True
    old = (rng.normal(size=(n, t)) * 0.1 - 5).astype(np.float32)
    adv = rng.normal(size=n).astype(np.float32)
    batch = {
        "tokens": jnp.asarray(tokens),
        "attention_mask": jnp.ones((n, t), bool),
        "completion_mask": jnp.asarray(comp),
        "old_logp": jnp.asarray(old),
        "advantages": jnp.asarray(adv),
    }
    ocfg = OptimConfig(lr=1e-6, trainable="adapter+llm", grad_clip=1.0)
    opt = make_optimizer(ocfg, model.params)
    step = make_train_step("grpo", R1V2(cfg), opt, policy_cfg=PolicyLossConfig(clip_high=0.28), donate=False)
    state = init_state(model.params, opt, 0)
    jax.block_until_ready(step(state, batch, None))
    t_jax = min(_timed(lambda: jax.block_until_ready(step(state, batch, None))) for _ in range(a.reps))

    # The same step in PyTorch: forward, token log-probs, the clipped loss, backward, AdamW.
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__))))
    from decode_throughput import torch_model

    hf = torch_model(model).train()
    for name, p in hf.named_parameters():
        p.requires_grad_(not name.startswith("model.vision_tower"))
    topt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-6, weight_decay=0.0)
    tt, tcomp = torch.tensor(tokens, dtype=torch.long), torch.tensor(comp)
    told, tadv = torch.tensor(old), torch.tensor(adv)

    def torch_step():
        topt.zero_grad(set_to_none=True)
        logits = hf(input_ids=tt).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tt[:, 1:, None])[..., 0]
        ratio = torch.exp(torch.clamp(lp - told[:, 1:], -20, 20))
        a_ = tadv[:, None]
        pg = torch.maximum(-a_ * ratio, -a_ * torch.clamp(ratio, 0.8, 1.28))
        m = tcomp[:, 1:].float()
        loss = ((pg * m).sum(1) / m.sum(1).clamp(min=1)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in hf.parameters() if p.requires_grad], 1.0)
        topt.step()

    torch_step()
    t_torch = min(_timed(torch_step) for _ in range(a.reps))
    flops = step_flops(cfg, n, t)
    peak = matmul_peak()
    print(
        f"\nGRPO train step, preset small ({r1v2_jax.count_params(model.params['language_model']) / 1e6:.0f}M LLM "
        f"parameters), {n} x {t} tokens, float32, {os.cpu_count()} CPUs"
    )
    print(f"{'':<28} | {'seconds':>8} | {'TFLOP/s':>8} | {'share of matmul peak':>20}")
    print("-" * 74)
    print(f"{'r1v2-jax (jit, scan)':<28} | {t_jax:8.3f} | {flops / t_jax / 1e12:8.3f} | {flops / t_jax / peak:20.1%}")
    print(
        f"{'PyTorch (eager, same step)':<28} | {t_torch:8.3f} | {flops / t_torch / 1e12:8.3f} | "
        f"{flops / t_torch / peak:20.1%}"
    )
    print(
        f"\nanalytic step FLOPs {flops / 1e12:.3f} T; measured matmul peak {peak / 1e12:.3f} TFLOP/s "
        f"(2048² float32 jnp.dot); PyTorch / r1v2-jax time: {t_torch / t_jax:.2f}x"
    )


if __name__ == "__main__":
    main()
