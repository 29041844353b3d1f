"""The resumable step loop every stage runs: restore, step, log, checkpoint."""

from __future__ import annotations

import json
import logging
import os
import time

from r1v2_jax.parallel import multihost as dist
from r1v2_jax.train.checkpoints import StageCheckpoints, sync_logs
from r1v2_jax.train.progress import Progress
from r1v2_jax.train.run import Run
from r1v2_jax.train.state import TrainState

log = logging.getLogger("r1v2_jax.train")


def run_loop(run: Run, stage: str, state: TrainState, steps: int, data_iter, one_step) -> TrainState:
    """The resumable loop every stage uses. ``one_step(state, batch) -> (state, metrics)``."""
    ckpt = StageCheckpoints(run, stage)
    start = 0
    latest = ckpt.latest()
    if latest is not None:
        state, data_state = ckpt.restore(latest, state)
        if data_state and data_iter is not None:
            data_iter.set_state(data_state)
        start = int(state.step)
        run.metrics.truncate(start, stage)
        log.info("%s: resumed from step %d", stage, start)
    bar = Progress(stage, steps, start, every_s=run.progress_seconds, enabled=run.progress and dist.is_main())
    timing_path = os.path.join(run.run_dir, "timing.jsonl")
    try:
        while int(state.step) < steps:
            t0 = time.perf_counter()
            batch = next(data_iter) if data_iter is not None else None
            state, metrics = one_step(state, batch)
            step = int(state.step)
            timings = {k: metrics.pop(k) for k in list(metrics) if k.endswith("_seconds") or k.endswith("_per_s")}
            row = {"stage": stage, "step": step, **{k: v for k, v in metrics.items() if not k.startswith("_")}}
            run.metrics.write(row)
            if dist.is_main():
                with open(timing_path, "a") as f:
                    f.write(json.dumps({"stage": stage, "step": step, "seconds": time.perf_counter() - t0,
                                        **{k: float(v) for k, v in timings.items()}}) + "\n")
            bar.update(step, row)
            if step % run.checkpoint_every == 0 or step == steps:
                ckpt.save(step, state, data_iter.get_state() if data_iter is not None else None, force=step == steps)
                sync_logs(run.run_dir, run.checkpoint_dir)
    finally:
        bar.close()
        ckpt.close()
    return state
