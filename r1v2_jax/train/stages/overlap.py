"""One-step off-policy GRPO (``grpo.rollout_ahead=1``): the rollout for step t + 1 runs on the
sampler's devices while the learner updates step t on its own, disjoint devices
(``sampler_devices``, :func:`r1v2_jax.train.experiment.split_meshes`).

Step t (parameters θ_t on the learner, and on the sampler since the push after step t − 1):

1. dispatch the rollout of the next batch with θ_t on the sampler mesh (asynchronous);
2. dispatch the update of step t on the learner mesh, on the *pending* rollout: the batch of
   step t, sampled with θ_{t−1} (θ_0 for steps 0 and 1: the first rollout is made before the
   loop), its ``old_logp`` the sampler's log-probs of the sampled tokens under θ_{t−1};
3. on the host, wait for the rollout only, and score it (rewards, advantages) while the update
   still computes; it becomes the pending rollout of step t + 1 (``gen_step`` = t);
4. wait for the update, and push θ_{t+1} to the sampler: ``jax.device_put`` of the learner's
   arrays onto the sampler mesh's NamedShardings, a device-to-device copy (no host round
   trip); only the trainable subtrees (``grpo.optim.trainable``), the frozen ones being the
   same on both sides.

No thread: JAX dispatch is asynchronous, so the two meshes' programs run at once while the
host scores. The clipped ratio uses the pending samples' stored sampling log-probs (one step
stale); ``grpo.loss.tis_cap`` adds truncated importance sampling (:func:`r1v2_jax.rl.losses.policy_loss`).
Metrics: ``staleness_mean`` / ``staleness_max`` (steps between sampling and training, SSB
replays included), ``ratio_mean`` / ``ratio_max``, and with TIS ``is_ratio_*`` and
``tis_capped_frac``.

Resume: the pending rollout is checkpointed with the step state (``TrainState.pending``, in
the same orbax save as the parameters, so a kill leaves the old pair or the new one), and the
data iterator's saved state is past the pending batch. Recomputing it instead would need
θ_{t−1}, which the checkpoint does not hold (keeping it would double a 38B checkpoint), while a
rollout is tokens and log-probs: megabytes. After a restore the sampler gets the restored
parameters whole. Every step rolls out the next batch, the last one too (its rollout is
checkpointed, so a run extended past ``steps`` resumes exactly): one rollout more than steps.
"""

from __future__ import annotations

import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

from r1v2_jax.model.vlm import param_shardings
from r1v2_jax.parallel import multihost as dist
from r1v2_jax.train.loop import run_loop
from r1v2_jax.train.rollout import rollout, start_rollout
from r1v2_jax.train.run import Run
from r1v2_jax.train.state import TrainState, step_key, trainable_labels


@flax.struct.dataclass
class Pending:
    """A scored rollout waiting for its update: the learner's device batch (tokens, masks,
    ``old_logp``, ``_advantages``, ``_total``, ``gen_step``; see ``GRPOStep.prepare``) and its
    reward metrics (f32[] each), logged with the step that trains on it."""

    batch: dict
    metrics: dict


class SamplerWeights:
    """The sampler mesh's copy of the parameters, and the step they are of."""

    def __init__(self, run: Run, trainable: str):
        self.run, self.trainable = run, trainable
        self.shardings = param_shardings(run.model_config, run.sampler_mesh)
        self.params, self.step = None, -1

    def push(self, params, step: int) -> None:
        """Reshard ``params`` (learner mesh) onto the sampler mesh, device to device; after the
        first push only the trainable subtrees move."""
        if self.params is None or self.step != step - 1:
            self.params = jax.device_put(params, self.shardings)
        else:
            labels = trainable_labels(params, self.trainable)
            self.params = jax.tree.map(
                lambda lab, old, new, sh: jax.device_put(new, sh) if lab == "train" else old,
                labels,
                self.params,
                params,
                self.shardings,
            )
        self.step = step


def pending_of(g, out, pix, batch, gen_step: int) -> tuple[Pending, float]:
    """``out`` (a finished rollout of ``batch``, this host's rows) scored -> (Pending, completion tokens)."""
    dev, metrics = g.prepare(out, pix, batch, gen_step)
    tokens = metrics.pop("_tokens")
    scalars = {k: jnp.asarray(np.float32(v)) for k, v in metrics.items()}
    return Pending(batch=dev, metrics=dist.replicated(scalars, g.run.mesh)), tokens


def run_ahead(g, state: TrainState, it) -> TrainState:
    """The GRPO loop with the rollout one step ahead (see the module docstring); ``g``: the
    stage's :class:`~r1v2_jax.train.stages.grpo.GRPOStep`."""
    run, cfg = g.run, g.cfg
    if run.sampler_mesh is None or set(run.sampler_mesh.devices.flat) & set(run.mesh.devices.flat):
        raise ValueError("grpo.rollout_ahead: needs the learner and the sampler on disjoint devices (sampler_devices)")
    weights = SamplerWeights(run, cfg.optim.trainable)
    weights.push(state.params, 0)
    first = next(it)  # step 0's batch (on resume the loop restores the iterator's state)
    out, pix = rollout(run, g.sampler, weights.params, first, g.sp, cfg.group_size, step_key(state, 3), g.tiles)
    state = state.replace(pending=pending_of(g, out, pix, first, 0)[0])

    def one(state, batch):
        t = int(state.step)
        if weights.step != t:  # resumed: the sampler gets the restored parameters
            weights.push(state.params, t)
        cur = state.pending
        t0 = time.perf_counter()
        sampled, pix = start_rollout(
            run, g.sampler, weights.params, batch, g.sp, cfg.group_size, step_key(state, 1), g.tiles
        )
        state, metrics, m = g.update(state.replace(pending=None), cur.batch)
        out = sampled.host_local()
        t_roll = time.perf_counter() - t0
        nxt, tokens = pending_of(g, out, pix, batch, t)  # host scoring, while the update computes
        jax.block_until_ready(state.params)
        t_upd = time.perf_counter() - t0
        t1 = time.perf_counter()
        weights.push(state.params, t + 1)
        jax.block_until_ready(weights.params)
        metrics.update({k: float(v) for k, v in m.items()})
        metrics.update({k: float(v) for k, v in cur.metrics.items()})
        metrics.update(
            rollout_seconds=t_roll,
            update_seconds=t_upd,  # from dispatch, overlapping the rollout and scoring
            weight_push_seconds=time.perf_counter() - t1,
            tokens_per_s=float(tokens / max(t_roll, 1e-9)),
            skipped_samples=dist.total(it.skips.total),
        )
        return state.replace(pending=nxt), metrics

    return run_loop(run, "grpo", state, cfg.steps, it, one, max_consecutive_skips=cfg.optim.max_consecutive_skips)
