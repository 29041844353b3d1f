"""What a stage is: its config section, its runner, and the context every stage runs in.

A stage is one module under ``train/stages/`` defining a frozen section dataclass (its
config: ``steps``, ``micro_batches``, an :class:`~r1v2_jax.train.state.OptimConfig` ``optim``,
and its own fields) and ``run(ctx, params, section) -> params``, plus one entry in
:data:`r1v2_jax.train.stages.STAGES`. The experiment schema takes the stage's section from the
registry, so the section's fields are settable as ``--config.<stage>.<field>=v``.

A section also tells :func:`r1v2_jax.train.program.build_program` what to build: its
``step_kind`` (sft | rm | mpo | grpo), ``step_kwargs()`` for :func:`make_train_step`,
``needs_ref`` (whether the step reads a frozen reference copy) and, for rollout stages,
``max_new_tokens``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from r1v2_jax.train.run import Run


@dataclasses.dataclass
class StageContext:
    """What the stages of one experiment share while it runs."""

    run: Run
    exp: Any  # the Experiment (r1v2_jax.train.schema)
    train: list[dict]  # training records (``rl`` format)
    test: list[dict]
    ref: Any = None  # the frozen reference policy: SFT's result, else the first RL stage's start
    reward_params: Any = None  # a reward model trained by the ``rm`` stage

    def reference(self, params):
        """The frozen reference (its own buffers: train steps donate the state)."""
        if self.ref is None:
            self.ref = jax.tree.map(jnp.copy, params)
        return self.ref


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    section: type  # the frozen dataclass of its config
    run: Callable  # run(ctx: StageContext, params, section) -> params
    # False: the stage passes the policy through unchanged (rm), so the held-out evaluation
    # after it is the previous stage's, not run again
    changes_policy: bool = True


def positive(section, *names: str) -> None:
    """ValueError naming the first of ``names`` that is not > 0."""
    for n in names:
        v = getattr(section, n)
        if not v > 0:
            raise ValueError(f"{n}: must be > 0, got {v}")
