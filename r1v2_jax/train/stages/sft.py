"""The SFT (cold start) stage: the known answers in the reasoning format, as supervised targets."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from r1v2_jax.data.formats import SkipCounter
from r1v2_jax.data.pipeline import sequence_iterator
from r1v2_jax.parallel import multihost as dist
from r1v2_jax.train.loop import run_loop
from r1v2_jax.train.program import build_program
from r1v2_jax.train.run import device_batch, init_run_state, row_tiles
from r1v2_jax.train.stages.base import StageContext, positive
from r1v2_jax.train.state import OptimConfig


@dataclasses.dataclass(frozen=True)
class SFTSection:
    steps: int = 200
    micro_batches: int = 1
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-3, trainable="all"))

    step_kind = "sft"
    needs_ref = False

    def __post_init__(self):
        positive(self, "steps", "micro_batches")

    def step_kwargs(self) -> dict:
        return {}


def cold_start_response(record: dict) -> str:
    """A short reasoning-format answer for SFT cold start, built from the known answer."""
    hint = {"count": "count", "arith": "compute", "compare": "sizes", "color": "colour"}.get(
        record.get("category", ""), "think"
    )
    return f"{hint}</think>\\boxed{{{record['answer']}}}"


def run_sft(ctx: StageContext, params, sec: SFTSection):
    run = ctx.run
    records = [dict(r, prompt=r["question"], response=cold_start_response(r)) for r in ctx.train]
    prog = build_program("sft", ctx.exp, run.model_config, params, run.mesh)
    state = init_run_state(run, params, prog.optimizer)
    it = sequence_iterator(
        records,
        run.builder,
        dataclasses.replace(run.pipeline, seed=run.seed),
        kind="sft",
        tile_size=run.model_config.tile_size,
        skips=SkipCounter(),
    )

    def one(state, batch):
        keys = ("response_ids", "response_mask", "response_loss_mask", "response_positions")  # positions: packed
        b = device_batch(run, {k: batch[k] for k in keys if k in batch}, row_tiles(run, batch))
        state, m = prog.step(state, b, None)
        return state, {k: float(v) for k, v in m.items()} | {"skipped_samples": dist.total(it.skips.total)}

    params = run_loop(
        run, "sft", state, sec.steps, it, one, max_consecutive_skips=sec.optim.max_consecutive_skips
    ).params
    ctx.ref = jax.tree.map(jnp.copy, params)  # the reference of the stages that follow (its own buffers)
    return params
