"""The resumable step loop every stage runs: restore, step, log, checkpoint.

A run whose updates keep being skipped as non-finite (:func:`r1v2_jax.train.state.apply_gradients`)
stops with :class:`TrainingDiverged` after ``max_consecutive_skips`` skipped steps in a row
(``OptimConfig.max_consecutive_skips``), instead of running to the end with unchanged
parameters and exit 0. A skipped step leaves parameters and optimizer state as they were, so
every checkpoint holds parameters that trained finitely.
"""

from __future__ import annotations

import json
import logging
import os
import time

from r1v2_jax.parallel import multihost as dist
from r1v2_jax.train.checkpoints import StageCheckpoints, sync_logs
from r1v2_jax.train.metrics_log import repair_jsonl
from r1v2_jax.train.progress import Progress
from r1v2_jax.train.run import Run
from r1v2_jax.train.state import TrainState

log = logging.getLogger("r1v2_jax.train")


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps were skipped for non-finite losses, gradients or updates."""


def run_loop(
    run: Run, stage: str, state: TrainState, steps: int, data_iter, one_step, max_consecutive_skips: int = 0
) -> TrainState:
    """The resumable loop every stage uses. ``one_step(state, batch) -> (state, metrics)``;
    ``metrics["step_ok"]`` false marks a skipped update. ``max_consecutive_skips`` > 0: stop
    with :class:`TrainingDiverged` after that many skipped steps in a row."""
    ckpt = StageCheckpoints(run, stage)
    start = 0
    restored = ckpt.restore_latest(state)
    if restored is not None:
        latest, state, data_state = restored
        if data_state and data_iter is not None:
            data_iter.set_state(data_state)
        start = int(state.step)
        run.metrics.truncate(start, stage)
        log.info("%s: resumed from step %d", stage, start)
    bar = Progress(stage, steps, start, every_s=run.progress_seconds, enabled=run.progress and dist.is_main())
    timing_path = os.path.join(run.run_dir, "timing.jsonl")
    if dist.is_main():
        repair_jsonl(timing_path)
    skips_in_a_row = 0
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
                    f.write(
                        json.dumps(
                            {
                                "stage": stage,
                                "step": step,
                                "seconds": time.perf_counter() - t0,
                                **{k: float(v) for k, v in timings.items()},
                            }
                        )
                        + "\n"
                    )
            bar.update(step, row)
            skips_in_a_row = 0 if bool(metrics.get("step_ok", True)) else skips_in_a_row + 1
            if max_consecutive_skips and skips_in_a_row >= max_consecutive_skips:
                raise TrainingDiverged(
                    f"{stage}: stopped at step {step}: the last {skips_in_a_row} steps were all skipped (non-finite "
                    f"loss, gradients or updated parameters; loss {metrics.get('loss')}, grad_norm "
                    f"{metrics.get('grad_norm')}); the parameters have not changed since step {step - skips_in_a_row}."
                    " Lower the learning rate or check the data; re-running resumes from the last checkpoint. "
                    f"{stage}.optim.max_consecutive_skips={max_consecutive_skips} sets this limit (0: never stop)"
                )
            if step % run.checkpoint_every == 0 or step == steps:
                ckpt.save(step, state, data_iter.get_state() if data_iter is not None else None, force=step == steps)
                sync_logs(run.run_dir, run.checkpoint_dir)
    finally:
        bar.close()
        ckpt.close()
    return state
