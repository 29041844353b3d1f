"""Train state and optimizer: AdamW with warm-up + constant/cosine schedule, gradient
clipping, per-module trainability, and the skip-if-not-finite update."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

# Which top-level parameter subtrees train, by name.
TRAINABLE = {
    "adapter": ("mlp1",),  # the paper's best: adapter only
    "adapter+llm": ("mlp1", "language_model"),
    "adapter+vit": ("mlp1", "vision_model"),
    "llm": ("language_model",),
    "all": ("mlp1", "language_model", "vision_model"),
}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-6
    warmup_steps: int = 0
    schedule: str = "constant"  # or "cosine"
    total_steps: int = 0  # cosine decay's length; 0 = the stage's steps
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip (0 = off)
    trainable: str = "adapter"
    # Stop the stage (r1v2_jax.train.loop.TrainingDiverged) after this many consecutive steps
    # skipped for a non-finite loss, gradient or update; 0 = never stop.
    max_consecutive_skips: int = 10

    def __post_init__(self):
        # (a finite but runaway lr, e.g. 1e30, is stopped by the train loop: rolled-back updates,
        # then TrainingDiverged after max_consecutive_skips)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr: must be finite and > 0, got {self.lr}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            raise ValueError(f"eps: must be > 0, got {self.eps}")
        if not (self.weight_decay >= 0 and self.grad_clip >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay / grad_clip: must be >= 0, got {self.weight_decay}, {self.grad_clip}")
        if self.warmup_steps < 0 or self.total_steps < 0:
            raise ValueError(f"warmup_steps / total_steps: must be >= 0, got {self.warmup_steps}, {self.total_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if not isinstance(self.max_consecutive_skips, int) or self.max_consecutive_skips < 0:
            raise ValueError(f"max_consecutive_skips: expected an integer >= 0, got {self.max_consecutive_skips!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule: expected 'constant' or 'cosine', got {self.schedule!r}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable: expected one of {sorted(TRAINABLE)}, got {self.trainable!r}")


def schedule(cfg: OptimConfig) -> optax.Schedule:
    warm = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    else:
        main = optax.cosine_decay_schedule(
            cfg.lr, max((cfg.total_steps or 1000) - cfg.warmup_steps, 1), alpha=cfg.min_lr_ratio
        )
    if cfg.warmup_steps == 0:
        return main
    return optax.join_schedules([warm, main], [cfg.warmup_steps])


def trainable_labels(params: Any, trainable: str, extra_trainable: tuple[str, ...] = ()) -> Any:
    """A pytree of 'train' / 'freeze' labels over ``params`` (top-level subtree names decide;
    any other top-level key, e.g. a reward model's value head, trains when in ``extra_trainable``)."""
    names = set(TRAINABLE[trainable]) | set(extra_trainable)

    def label(path, _):
        top = path[0].key
        if top == "backbone":  # reward model: {"backbone": policy tree, "value_head": ...}
            top = path[1].key
        return "train" if top in names else "freeze"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(
    cfg: OptimConfig, params: Any, extra_trainable: tuple[str, ...] = ()
) -> optax.GradientTransformation:
    inner = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    )
    return optax.multi_transform(
        {"train": inner, "freeze": optax.set_to_zero()}, trainable_labels(params, cfg.trainable, extra_trainable)
    )


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; checkpointed whole."""

    step: jax.Array  # i32[]
    params: Any
    opt_state: Any
    rng: jax.Array  # u32[2] raw key data (checkpoint-friendly)
    bco_delta: jax.Array  # f32[] MPO's BCO shift δ (r1v2_jax.rl.mpo)
    bco_count: jax.Array  # i32[] batches averaged into δ (its running mean needs the count to resume)
    skipped: jax.Array  # i32[] steps skipped for non-finite loss/gradients
    ssb: Any = None  # SSBState (GRPO) or None
    # GRPO with rollout_ahead=1: the next step's scored rollout, sampled with the parameters of
    # the step before (r1v2_jax.train.stages.overlap.Pending); checkpointed with the rest
    pending: Any = None


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int, ssb=None) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        bco_delta=jnp.zeros((), jnp.float32),
        bco_count=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
        ssb=ssb,
    )


def step_key(state: TrainState, purpose: int) -> jax.Array:
    """A PRNG key for this step and purpose (deterministic in the seed and the step)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), purpose)


def all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def apply_gradients(
    state: TrainState, grads: Any, loss: jax.Array, optimizer: optax.GradientTransformation, **updates
) -> tuple[TrainState, jax.Array]:
    """One optimizer update, or none (parameters and optimizer state untouched, ``skipped``
    counted) when the loss or any gradient is not finite, or when the update itself would make
    a parameter or the optimizer state non-finite (a runaway step, e.g. a huge learning rate:
    it is rolled back). Returns (state, flag: the update was applied)."""
    ok = jnp.isfinite(loss) & all_finite(grads)
    safe = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), grads)
    upd, new_opt = optimizer.update(safe, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, upd)
    ok = ok & all_finite(new_params) & all_finite(new_opt)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    extra = {k: jnp.where(ok, v, getattr(state, k)) for k, v in updates.items()}
    return state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt, state.opt_state),
        skipped=state.skipped + (~ok).astype(jnp.int32),
        **extra,
    ), ok
