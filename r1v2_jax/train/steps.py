"""Jitted train steps for SFT, reward model, MPO and GRPO, sharing one structure:

    loss_fn(params, micro_batch) -> (LossSum, metrics)
    grads = Σ_micro ∇ LossSum.sum / Σ_micro LossSum.count      (exact accumulation)
    state = apply_gradients(state, grads)                      (skipped if not finite)

Batches are dicts of arrays with a leading batch axis; ``n_micro`` splits it evenly.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from r1v2_jax.model.vlm import R1V2, param_shardings
from r1v2_jax.parallel.multihost import batch_shards
from r1v2_jax.parallel.sharding import DEFAULT_RULES, use_mesh_rules
from r1v2_jax.rewards.reward_model import RewardModel, bradley_terry_loss
from r1v2_jax.rl.losses import LossSum, PolicyLossConfig, policy_loss, sequence_logprobs
from r1v2_jax.rl.mpo import MPOConfig, batch_reward_mean, bco_delta_update, implicit_rewards, mpo_loss
from r1v2_jax.train.logprobs import chunked_logprobs
from r1v2_jax.train.state import TrainState, apply_gradients, trainable_labels

log = logging.getLogger("r1v2_jax.train")


def next_token_logprobs(module: R1V2, params, ids, mask, pixel_values=None, with_entropy: bool = False, positions=None):
    """log p(ids[:, t] | ids[:, :t]) for t >= 1: f32[B, T-1] (and the entropy of each
    predictive distribution when asked). ``mask``: [B, T] segment ids (0/1, or packed rows'
    1, 2, ...; see :meth:`r1v2_jax.model.qwen2.Qwen2.decode`); ``positions``: i32[B, T] or None.

    The LM head runs ``config.logprob_chunk_size`` positions at a time (r1v2_jax.train.logprobs):
    no [B, T, V] float32 logits exist, forward or backward."""
    hidden = module.apply({"params": params}, ids, pixel_values, mask, positions, method=R1V2.hidden)
    lp, ent = chunked_logprobs(
        hidden[:, :-1],
        params["language_model"]["lm_head"]["kernel"],
        ids[:, 1:],
        chunk=module.config.logprob_chunk_size,
        with_entropy=with_entropy,
        dtype=jnp.dtype(module.config.dtype),
    )
    return (lp, ent) if with_entropy else lp


def sft_loss(module, params, batch, ref_params=None, state=None):
    """Token-mean NLL of the completion tokens (``response_loss_mask``). Packed batches
    (:func:`r1v2_jax.data.pipeline.collate_packed`) carry segment ids as ``response_mask`` and
    ``response_positions``; a target counts only within its own sequence's segment."""
    seg = batch["response_mask"]
    lp = next_token_logprobs(
        module, params, batch["response_ids"], seg, batch.get("pixel_values"), positions=batch.get("response_positions")
    )
    m = (batch["response_loss_mask"][:, 1:] & (seg[:, 1:] == seg[:, :-1])).astype(jnp.float32)
    loss = LossSum(-(lp * m).sum(), m.sum())
    return loss, {"nll": loss.value}


def rm_loss(module: RewardModel, params, batch, ref_params=None, state=None):
    pix = batch.get("pixel_values")
    both = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    pix2 = None if pix is None else jnp.concatenate([pix, pix])
    r = module.apply({"params": params}, both, pix2, mask)
    b = batch["chosen_ids"].shape[0]
    return bradley_terry_loss(r[:b], r[b:])


def _seq_logps(module, params, batch, name):
    lp = next_token_logprobs(module, params, batch[f"{name}_ids"], batch[f"{name}_mask"], batch.get("pixel_values"))
    m = batch[f"{name}_loss_mask"][:, 1:]
    return sequence_logprobs(lp, m), m.sum(axis=1)


def mpo_loss_fn(cfg: MPOConfig, delta, tokens_per_pair, module, params, batch, ref_params=None, state=None):
    """MPO on a micro-batch whose reference log-probs (``_ref_chosen``/``_ref_rejected``, f32[B])
    came from :func:`mpo_sequence_logps`; ``delta`` and ``tokens_per_pair`` are the whole batch's."""
    pc, nc = _seq_logps(module, params, batch, "chosen")
    pr, _ = _seq_logps(module, params, batch, "rejected")
    return mpo_loss(pc, pr, batch["_ref_chosen"], batch["_ref_rejected"], nc, delta, cfg, tokens_per_pair)


def mpo_sequence_logps(module, params, ref_params, batch: dict, n_micro: int) -> dict[str, jax.Array]:
    """Sequence log-probs of the whole batch under the policy and the reference, no gradients,
    one micro-batch at a time: {policy,ref}_{chosen,rejected} f32[B], chosen_tokens [B].

    The pass BCO's δ needs before the loss (TRL's running mean includes the current batch);
    it costs one extra forward of the policy per step, and the reference's forward moves here
    from the gradient pass."""
    params, ref_params = jax.lax.stop_gradient(params), jax.lax.stop_gradient(ref_params)
    micro = jax.tree.map(lambda x: x.reshape((n_micro, x.shape[0] // n_micro) + x.shape[1:]), batch)

    def one(mb):
        pc, nc = _seq_logps(module, params, mb, "chosen")
        pr, _ = _seq_logps(module, params, mb, "rejected")
        rc, _ = _seq_logps(module, ref_params, mb, "chosen")
        rr, _ = _seq_logps(module, ref_params, mb, "rejected")
        return {"policy_chosen": pc, "policy_rejected": pr, "ref_chosen": rc, "ref_rejected": rr, "chosen_tokens": nc}

    out = jax.lax.map(one, micro)
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), out)


def grpo_loss_fn(cfg: PolicyLossConfig, module, params, batch, ref_params, state):
    """batch: tokens i32[N, T], attention_mask [N, T], completion_mask [N, T] (True at generated
    tokens), old_logp f32[N, T] (log-prob of token t under the sampling policy, at t),
    advantages f32[N], optional pixel_values f32[N, K, 3, S, S]."""
    lp, ent = next_token_logprobs(
        module, params, batch["tokens"], batch["attention_mask"], batch.get("pixel_values"), with_entropy=True
    )
    ref = None
    if ref_params is not None:
        ref = next_token_logprobs(
            module,
            jax.lax.stop_gradient(ref_params),
            batch["tokens"],
            batch["attention_mask"],
            batch.get("pixel_values"),
        )
    return policy_loss(
        lp,
        batch["old_logp"][:, 1:],
        batch["advantages"],
        batch["completion_mask"][:, 1:],
        cfg,
        ref_logp=ref,
        entropy=ent,
    )


def accumulate(loss_fn: Callable, params, batch: dict, n_micro: int, frozen=None, grad_shardings=None):
    """Exact gradient accumulation over ``n_micro`` equal slices of the batch: (gradients of
    the whole-batch loss Σsum/Σcount, the whole-batch LossSum, metrics averaged over slices).

    ``frozen``: a pytree of bools over ``params``; frozen leaves are held under
    ``stop_gradient`` (their gradients are zeros, and no weight gradient is computed for them;
    activations still carry gradients through them). ``grad_shardings``: shardings to keep the
    gradient accumulators in (the parameters' own), so they stay sharded like FSDP weights."""

    def split(x):
        return x.reshape((n_micro, x.shape[0] // n_micro) + x.shape[1:])

    micro = jax.tree.map(split, batch)

    def pin(g):
        return g if grad_shardings is None else jax.lax.with_sharding_constraint(g, grad_shardings)

    def objective(p, mb):
        if frozen is not None:
            p = jax.tree.map(lambda x, f: jax.lax.stop_gradient(x) if f else x, p, frozen)
        loss, metrics = loss_fn(p, mb)
        return loss.sum, (loss, metrics)

    def body(carry, mb):
        g_acc, s_acc, c_acc = carry
        (_, (loss, metrics)), g = jax.value_and_grad(objective, has_aux=True)(params, mb)
        g_acc = pin(jax.tree.map(jnp.add, g_acc, pin(g)))
        return (g_acc, s_acc + loss.sum, c_acc + loss.count), metrics

    zeros = pin(jax.tree.map(jnp.zeros_like, params))
    (g, s, c), metrics = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)), micro)
    c = jnp.maximum(c, 1e-9)
    grads = jax.tree.map(lambda x: x / c, g)
    # Metrics whose name starts with "_" are per-example values: keep them all.
    metrics = {k: (v.reshape((-1,) + v.shape[2:]) if k.startswith("_") else v.mean(axis=0)) for k, v in metrics.items()}
    return grads, LossSum(s, c), metrics


def make_train_step(
    kind: str,
    module,
    optimizer: optax.GradientTransformation,
    *,
    n_micro: int = 1,
    policy_cfg: PolicyLossConfig | None = None,
    mpo_cfg: MPOConfig | None = None,
    mesh=None,
    rules=None,
    donate: bool = True,
    trainable: str | None = None,
    extra_trainable: tuple[str, ...] = (),
):
    """A jitted ``step(state, batch, ref_params) -> (state, metrics)`` for ``kind`` in
    sft / rm / mpo / grpo. ``ref_params`` is the frozen reference (MPO, GRPO's KL) or None.

    ``trainable`` (as in :class:`OptimConfig`): modules outside it get no weight gradients at
    all (``stop_gradient``), rather than gradients the optimizer then discards; the reported
    ``grad_norm`` covers the trained modules. With a mesh, gradient accumulators of the
    policy model are kept in the parameters' shardings."""
    losses = {
        "sft": sft_loss,
        "rm": rm_loss,
        "mpo": mpo_loss_fn,  # bound to this batch's δ inside the step
        "grpo": functools.partial(grpo_loss_fn, policy_cfg or PolicyLossConfig()),
    }
    if kind not in losses:
        raise ValueError(f"train step kind: expected one of {sorted(losses)}, got {kind!r}")
    fn = losses[kind]
    mcfg = mpo_cfg or MPOConfig()

    def step(state: TrainState, batch: dict, ref_params):

        if mesh is not None:  # trace time: say when micro-batches cannot be split evenly over the batch axes
            rows = jax.tree.leaves(batch)[0].shape[0] // n_micro
            shards = batch_shards(mesh)
            if rows % shards:
                log.warning(
                    "%s step: a micro-batch of %d rows over data x fsdp = %d devices does not divide "
                    "evenly (XLA pads or replicates: wasted compute); use fewer micro-batches or a "
                    "bigger batch",
                    kind,
                    rows,
                    shards,
                )

        frozen = None
        if trainable is not None:
            labels = trainable_labels(state.params, trainable, extra_trainable)
            frozen = jax.tree.map(lambda lab: lab == "freeze", labels)
        grad_sh = None
        if mesh is not None and isinstance(module, R1V2):
            grad_sh = param_shardings(module.config, mesh, rules or DEFAULT_RULES)
        extra = {}
        with use_mesh_rules(mesh, rules or DEFAULT_RULES):
            loss_fn = fn
            if kind == "mpo":  # BCO's δ first, from this batch's rewards (see r1v2_jax.rl.mpo)
                seq = mpo_sequence_logps(module, state.params, ref_params, batch, n_micro)
                x = batch_reward_mean(
                    implicit_rewards(seq["policy_chosen"], seq["ref_chosen"], mcfg),
                    implicit_rewards(seq["policy_rejected"], seq["ref_rejected"], mcfg),
                )
                extra["bco_delta"], extra["bco_count"] = bco_delta_update(state.bco_delta, state.bco_count, x, mcfg)
                per_pair = seq["chosen_tokens"].astype(jnp.float32).mean()
                loss_fn = functools.partial(mpo_loss_fn, mcfg, extra["bco_delta"], per_pair)
                batch = dict(batch, _ref_chosen=seq["ref_chosen"], _ref_rejected=seq["ref_rejected"])
            grads, loss, metrics = accumulate(
                lambda p, mb: loss_fn(module, p, mb, ref_params, state),
                state.params,
                batch,
                n_micro,
                frozen=frozen,
                grad_shardings=grad_sh,
            )
        new_state, ok = apply_gradients(state, grads, loss.value, optimizer, **extra)
        metrics = dict(
            metrics, loss=loss.value, grad_norm=optax.tree.norm(grads), step_ok=ok, skipped_steps=new_state.skipped
        )
        return new_state, metrics

    return jax.jit(step, donate_argnums=(0,) if donate else ())
