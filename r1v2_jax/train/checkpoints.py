"""Per-stage orbax checkpoints of the whole train state plus each host's data-iterator state,
and the log mirroring beside remote checkpoints."""

from __future__ import annotations

import logging
import os

import jax

from r1v2_jax.parallel import multihost as dist
from r1v2_jax.train.run import Run
from r1v2_jax.train.state import TrainState

log = logging.getLogger("r1v2_jax.train")


class StageCheckpoints:
    def __init__(self, run: Run, stage: str):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        root = run.checkpoint_dir or os.path.join(run.run_dir, "checkpoints")
        self.dir = root.rstrip("/") + "/" + stage if "://" in root else os.path.abspath(os.path.join(root, stage))
        opts = ocp.CheckpointManagerOptions(max_to_keep=run.keep, enable_async_checkpointing=run.async_checkpoints,
                                            create=True)
        self.manager = ocp.CheckpointManager(self.dir, options=opts)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict | None, force: bool = False) -> None:
        hosts = dist.allgather_json(data_state or {})  # each host's iterator state, in process order
        args = self.ocp.args.Composite(state=self.ocp.args.StandardSave(state),
                                       data=self.ocp.args.JsonSave({"hosts": hosts}))
        self.manager.save(step, args=args, force=force)

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict]:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
                                if hasattr(x, "shape") else x, target)
        out = self.manager.restore(step, args=self.ocp.args.Composite(state=self.ocp.args.StandardRestore(abstract),
                                                                      data=self.ocp.args.JsonRestore()))
        hosts = out["data"].get("hosts", [out["data"]])
        if len(hosts) != jax.process_count():
            raise ValueError(f"{self.dir}/{step}: checkpoint written by {len(hosts)} host(s), resumed on "
                             f"{jax.process_count()}: the data iterators cannot be split differently (start a new "
                             "run_dir from these parameters instead)")
        return out["state"], hosts[jax.process_index()]

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


LOG_FILES = ("metrics.jsonl", "timing.jsonl", "summary.json")


def sync_logs(run_dir: str, checkpoint_dir: str, pull: bool = False) -> None:
    """Keep a run's logs beside a separate ``checkpoint_dir`` (e.g. a bucket), so a run that
    resumes on a new machine from those checkpoints also continues its logs. ``pull`` copies
    them down when ``run_dir`` has none. Process 0 only; nothing without a ``checkpoint_dir``."""
    if not checkpoint_dir or not dist.is_main():
        return
    from etils import epath

    remote, local = epath.Path(checkpoint_dir) / "logs", epath.Path(run_dir)
    if pull and (local / "metrics.jsonl").exists():
        return
    for name in LOG_FILES:
        src, dst = (remote / name, local / name) if pull else (local / name, remote / name)
        if src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.parent / (name + ".partial")
            tmp.write_bytes(src.read_bytes())
            tmp.rename(dst)
