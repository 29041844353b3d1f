"""What a stage runs, built once from its config section: the optimizer, the jitted train
step, whether it needs a frozen reference copy of the parameters, and the layout of its
batches. ``r1v2 train`` and ``r1v2 plan`` both build through :func:`build_program`, so the
planner compiles exactly the step that training runs (reference parameters, loss settings,
dtypes and the SSB buffer in the state included)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from r1v2_jax.model.vlm import R1V2
from r1v2_jax.rewards.reward_model import RewardModel
from r1v2_jax.rl.ssb import ssb_shardings
from r1v2_jax.train.state import OptimConfig, TrainState, init_state, make_optimizer
from r1v2_jax.train.steps import make_train_step

_PAIR = tuple(
    (f"{w}_{k}", dt)
    for w in ("chosen", "rejected")
    for k, dt in (("ids", jnp.int32), ("mask", jnp.bool_), ("loss_mask", jnp.bool_))
)
# per-token arrays of each step kind's batch ([rows, seq_len]); GRPO also has per-row advantages
BATCH_LAYOUTS = {
    "sft": (("response_ids", jnp.int32), ("response_mask", jnp.bool_), ("response_loss_mask", jnp.bool_)),
    "rm": tuple((k, dt) for k, dt in _PAIR if not k.endswith("loss_mask")),
    "mpo": _PAIR,
    "grpo": (
        ("tokens", jnp.int32),
        ("attention_mask", jnp.bool_),
        ("completion_mask", jnp.bool_),
        ("old_logp", jnp.float32),
    ),
}
# a packed preference batch (collate_packed: several pairs per row), for the MPO and RM steps
PACKED_PAIR_KEYS = (
    "packed_ids",
    "packed_mask",
    "packed_positions",
    "packed_loss_mask",
    "packed_slot",
    "packed_name",
    "packed_valid",
)
PIXEL_DTYPE = jnp.float32  # what the data pipeline feeds (the model casts to its compute dtype)


@dataclasses.dataclass(frozen=True)
class StageProgram:
    kind: str  # the train step's kind: sft | rm | mpo | grpo
    optim: OptimConfig
    optimizer: optax.GradientTransformation
    step: Callable  # jitted step(state, batch, ref_params) -> (state, metrics)
    needs_ref: bool  # the step reads a frozen reference copy of the parameters
    seq_len: int  # tokens per row (GRPO: prompt + max_new_tokens; SFT/MPO/RM: the longest bucket)

    def batch_spec(self, rows: int, tiles: int, tile_size: int, sharding=None) -> dict:
        """ShapeDtypeStructs of one global batch (``tiles`` image tiles per row, 0 = text only)."""
        sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)  # noqa: E731
        out = {k: sds((rows, self.seq_len), dt) for k, dt in BATCH_LAYOUTS[self.kind]}
        if self.kind == "grpo":
            out["advantages"] = sds((rows,), jnp.float32)
        if tiles:
            out["pixel_values"] = sds((rows, tiles, 3, tile_size, tile_size), PIXEL_DTYPE)
        return out

    def example_spec(self, tiles: int, tile_size: int) -> dict:
        """One GRPO training example (the SSB's payload layout): a row of the batch without its
        advantage, with the step that generated it (``gen_step``)."""
        spec = self.batch_spec(1, tiles, tile_size)
        spec.pop("advantages", None)
        if self.kind == "grpo":  # the step its parameters were sampled at (staleness of replays)
            spec["gen_step"] = jax.ShapeDtypeStruct((1,), jnp.int32)
        return spec

    def abstract_state(self, params, mesh=None, seed: int = 0, ssb=None) -> TrainState:
        """The train state as ShapeDtypeStructs (``params`` abstract, with shardings on a mesh):
        Adam's moments sharded like their parameters (as eager ``optimizer.init`` on sharded
        parameters makes them), the SSB over the batch axes, everything else replicated."""
        state = jax.eval_shape(lambda p, s: init_state(p, self.optimizer, seed, ssb=s), params, ssb)
        if mesh is None:
            return state
        rep = NamedSharding(mesh, P())
        by_path = {tuple(k.key for k in kp): x.sharding for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}

        def opt_leaf(kp, a):
            keys = tuple(k.key for k in kp if isinstance(k, jax.tree_util.DictKey))
            sh = next((by_path[keys[i:]] for i in range(len(keys)) if keys[i:] in by_path), rep)
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh if a.shape else rep)

        place = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep)  # noqa: E731
        with_sh = lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)  # noqa: E731
        return state.replace(
            params=params,
            opt_state=jax.tree_util.tree_map_with_path(opt_leaf, state.opt_state),
            # the SSB split over the batch axes as training makes it (r1v2_jax.train.run.init_ssb)
            ssb=None if state.ssb is None else jax.tree.map(with_sh, state.ssb, ssb_shardings(state.ssb, mesh)),
            # every other field (step, rng, BCO state, skip counts, ...) replicated
            **{
                f.name: jax.tree.map(place, getattr(state, f.name))
                for f in dataclasses.fields(state)
                if f.name not in ("params", "opt_state", "ssb")
            },
        )


def build_program(
    name: str,
    exp,
    model_config,
    params,
    mesh=None,
    donate: bool = True,
    prompt_len: int | None = None,
    micro_batches: int | None = None,
) -> StageProgram:
    """The program of stage ``name`` of experiment ``exp`` for ``params`` (concrete or abstract).
    ``prompt_len``: GRPO's prompt length (default ``data.max_prompt_len``, the length bucket
    training pads prompts to); ``micro_batches`` overrides the section's (the planner's
    one-micro-batch cost variants)."""
    sec = getattr(exp, name)
    kind = sec.step_kind
    optim = sec.optim if sec.optim.total_steps else dataclasses.replace(sec.optim, total_steps=sec.steps)
    extra = ("value_head",) if kind == "rm" else ()
    optimizer = make_optimizer(optim, params, extra_trainable=extra)
    module = RewardModel(model_config) if kind == "rm" else R1V2(model_config)
    step = make_train_step(
        kind,
        module,
        optimizer,
        n_micro=micro_batches or sec.micro_batches,
        mesh=mesh,
        trainable=optim.trainable,
        extra_trainable=extra,
        donate=donate,
        **sec.step_kwargs(),
    )
    data = exp.data
    seq_len = (
        (prompt_len or data.max_prompt_len) + sec.max_new_tokens
        if kind == "grpo"
        else data.max_prompt_len + data.max_completion_len
    )
    return StageProgram(
        kind=kind, optim=optim, optimizer=optimizer, step=step, needs_ref=sec.needs_ref, seq_len=seq_len
    )


def abstract_args(
    program: StageProgram, params, rows: int, tiles: int, tile_size: int, mesh=None, ssb=None
) -> tuple[Any, dict, Any]:
    """(state, batch, reference parameters or None) as ShapeDtypeStructs: what ``program.step``
    is called with for a global batch of ``rows`` rows."""
    row = NamedSharding(mesh, P(("data", "fsdp"))) if mesh is not None else None
    state = program.abstract_state(params, mesh, ssb=ssb)
    return state, program.batch_spec(rows, tiles, tile_size, row), (state.params if program.needs_ref else None)
