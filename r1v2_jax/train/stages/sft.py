"""The SFT (cold start) stage."""

from __future__ import annotations

import dataclasses
import logging

from r1v2_jax.data.formats import SkipCounter
from r1v2_jax.data.pipeline import sequence_iterator
from r1v2_jax.parallel import multihost as dist
from r1v2_jax.train.loop import run_loop
from r1v2_jax.train.run import Run, device_batch, init_run_state, row_tiles
from r1v2_jax.train.state import OptimConfig, make_optimizer
from r1v2_jax.train.steps import make_train_step

log = logging.getLogger("r1v2_jax.train")


def run_sft(run: Run, params, records: list[dict], steps: int, optim: OptimConfig, n_micro: int = 1):
    opt = make_optimizer(optim, params)
    state = init_run_state(run, params, opt)
    it = sequence_iterator(records, run.builder, dataclasses.replace(run.pipeline, seed=run.seed), kind="sft",
                           tile_size=run.model_config.tile_size, skips=SkipCounter())
    step_fn = make_train_step("sft", run.module, opt, n_micro=n_micro, mesh=run.mesh, trainable=optim.trainable)

    def one(state, batch):
        keys = ("response_ids", "response_mask", "response_loss_mask", "response_positions")  # positions: packed
        b = device_batch(run, {k: batch[k] for k in keys if k in batch}, row_tiles(run, batch))
        state, m = step_fn(state, b, None)
        return state, {k: float(v) for k, v in m.items()} | {"skipped_samples": dist.total(it.skips.total)}

    return run_loop(run, "sft", state, steps, it, one).params
