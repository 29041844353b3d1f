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
from r1v2_jax.rl.losses import LossSum, PolicyLossConfig, masked_mean, policy_loss, sequence_logprobs
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


def _slot_sums(x: jax.Array, batch: dict, shift: int) -> jax.Array:
    """Per-token values x f[R, L - shift] of packed rows (aligned with tokens shift..L-1) summed
    into their example's slot and sequence: f[R, K, 2] (``packed_slot`` / ``packed_name``;
    padding tokens, slot -1, go nowhere)."""
    slot, name = batch["packed_slot"][:, shift:], batch["packed_name"][:, shift:]
    r, k = batch["packed_valid"].shape
    rows = jnp.broadcast_to(jnp.arange(r)[:, None], slot.shape)
    where = jnp.where(slot < 0, k, slot)  # out of range: dropped
    return jnp.zeros((r, k, 2), x.dtype).at[rows, where, jnp.maximum(name, 0)].add(x, mode="drop")


def rm_loss(module: RewardModel, params, batch, ref_params=None, state=None):
    """Bradley-Terry over the batch's pairs; packed rows (``packed_*``, several pairs per row,
    see :func:`r1v2_jax.data.pipeline.collate_packed`): each sequence's score is read at its
    segment's last token and the pairs are the rows' valid slots."""
    pix = batch.get("pixel_values")
    if "packed_ids" in batch:
        seg = batch["packed_mask"]
        scores = module.apply(
            {"params": params},
            batch["packed_ids"],
            pix,
            seg,
            batch["packed_positions"],
            method=RewardModel.token_scores,
        )
        nxt = jnp.concatenate([seg[:, 1:], jnp.zeros_like(seg[:, :1])], axis=1)
        last = ((seg > 0) & (nxt != seg)).astype(scores.dtype)
        s = _slot_sums(scores * last, batch, 0)
        return bradley_terry_loss(s[..., 0].ravel(), s[..., 1].ravel(), batch["packed_valid"].ravel())
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


def pair_logps(module, params, batch) -> dict[str, jax.Array]:
    """Sequence log-probs of a batch's pairs: chosen, rejected, chosen_tokens, and valid (None
    unless packed). Unpacked: f32[B] each. Packed rows (``packed_*``: both sequences of a pair
    in one row, several pairs per row): [R, K], one entry per pair slot of each row, ``valid``
    where a slot holds a pair; a token counts only within its own sequence's segment."""
    if "packed_ids" not in batch:
        pc, nc = _seq_logps(module, params, batch, "chosen")
        pr, _ = _seq_logps(module, params, batch, "rejected")
        return {"chosen": pc, "rejected": pr, "chosen_tokens": nc, "valid": None}
    seg = batch["packed_mask"]
    lp = next_token_logprobs(
        module, params, batch["packed_ids"], seg, batch.get("pixel_values"), positions=batch["packed_positions"]
    )
    m = (batch["packed_loss_mask"][:, 1:] & (seg[:, 1:] == seg[:, :-1])).astype(jnp.float32)
    s, n = _slot_sums(lp * m, batch, 1), _slot_sums(m, batch, 1)
    return {"chosen": s[..., 0], "rejected": s[..., 1], "chosen_tokens": n[..., 0], "valid": batch["packed_valid"]}


def mpo_loss_fn(cfg: MPOConfig, delta, tokens_per_pair, module, params, batch, ref_params=None, state=None):
    """MPO on a micro-batch whose reference log-probs (``_ref_chosen``/``_ref_rejected``, f32[B]
    or, packed, [R, K]) came from :func:`mpo_sequence_logps`; ``delta`` and ``tokens_per_pair``
    are the whole batch's."""
    lp = pair_logps(module, params, batch)
    flat = lambda x: None if x is None else x.reshape(-1)  # noqa: E731 - packed [R, K] -> pair slots
    return mpo_loss(
        flat(lp["chosen"]),
        flat(lp["rejected"]),
        flat(batch["_ref_chosen"]),
        flat(batch["_ref_rejected"]),
        flat(lp["chosen_tokens"]),
        delta,
        cfg,
        tokens_per_pair,
        valid=flat(lp["valid"]),
    )


def mpo_sequence_logps(module, params, ref_params, batch: dict, n_micro: int) -> dict[str, jax.Array]:
    """Sequence log-probs of the whole batch under the policy and the reference, no gradients,
    one micro-batch at a time: {policy,ref}_{chosen,rejected} f32[B], chosen_tokens [B].

    The pass BCO's δ needs before the loss (TRL's running mean includes the current batch);
    it costs one extra forward of the policy per step, and the reference's forward moves here
    from the gradient pass."""
    params, ref_params = jax.lax.stop_gradient(params), jax.lax.stop_gradient(ref_params)
    micro = jax.tree.map(lambda x: x.reshape((n_micro, x.shape[0] // n_micro) + x.shape[1:]), batch)

    def one(mb):
        pol, ref = pair_logps(module, params, mb), pair_logps(module, ref_params, mb)
        out = {"policy_chosen": pol["chosen"], "policy_rejected": pol["rejected"], "ref_chosen": ref["chosen"]}
        out.update(ref_rejected=ref["rejected"], chosen_tokens=pol["chosen_tokens"])
        if pol["valid"] is not None:
            out["valid"] = pol["valid"]
        return out

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
                flat = {k: v.reshape(-1) for k, v in seq.items()}  # packed: [R, K] pair slots
                valid = flat.get("valid")
                x = batch_reward_mean(
                    implicit_rewards(flat["policy_chosen"], flat["ref_chosen"], mcfg),
                    implicit_rewards(flat["policy_rejected"], flat["ref_rejected"], mcfg),
                    valid,
                )
                extra["bco_delta"], extra["bco_count"] = bco_delta_update(state.bco_delta, state.bco_count, x, mcfg)
                n = flat["chosen_tokens"].astype(jnp.float32)
                per_pair = n.mean() if valid is None else masked_mean(n, valid)
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
