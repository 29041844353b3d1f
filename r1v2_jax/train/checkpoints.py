"""Per-stage orbax checkpoints of the whole train state plus each host's data-iterator state,
and the log mirroring beside remote checkpoints.

Resuming (:meth:`StageCheckpoints.restore_latest`) tries the newest checkpoint first and falls
back to the newest one that restores, saying so: a checkpoint that cannot be read (a file lost
or cut short, say by a copy or a full disk) is moved aside as ``corrupt-<step>`` (deleted in a
bucket), so training continues from the older one and saves that step again later. When none
restores it is an error listing each checkpoint's failure.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time

import fsspec
import jax
import orbax.checkpoint as ocp
from etils import epath

from r1v2_jax.parallel import multihost as dist
from r1v2_jax.train.run import Run
from r1v2_jax.train.state import TrainState

log = logging.getLogger("r1v2_jax.train")


class ResumeError(ValueError):
    """The checkpoints of a stage exist but none can be resumed from."""


class StageCheckpoints:
    def __init__(self, run: Run, stage: str):

        self.ocp = ocp
        root = run.checkpoint_dir or os.path.join(run.run_dir, "checkpoints")
        self.dir = root.rstrip("/") + "/" + stage if "://" in root else os.path.abspath(os.path.join(root, stage))
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=run.keep, enable_async_checkpointing=run.async_checkpoints, create=True
        )
        self.manager = ocp.CheckpointManager(self.dir, options=opts)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict | None, force: bool = False) -> None:
        hosts = dist.allgather_json(data_state or {})  # each host's iterator state, in process order
        args = self.ocp.args.Composite(
            state=self.ocp.args.StandardSave(state), data=self.ocp.args.JsonSave({"hosts": hosts})
        )
        self.manager.save(step, args=args, force=force)

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict]:
        abstract = jax.tree.map(
            lambda x: (
                jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
                if hasattr(x, "shape")
                else x
            ),
            target,
        )
        out = self.manager.restore(
            step,
            args=self.ocp.args.Composite(
                state=self.ocp.args.StandardRestore(abstract), data=self.ocp.args.JsonRestore()
            ),
        )
        hosts = out["data"].get("hosts", [out["data"]])
        if len(hosts) != jax.process_count():
            raise ResumeError(
                f"{self.dir}/{step}: checkpoint written by {len(hosts)} host(s), resumed on "
                f"{jax.process_count()}: the data iterators cannot be split differently (start a new "
                "run_dir from these parameters instead)"
            )
        return out["state"], hosts[jax.process_index()]

    def restore_latest(self, target: TrainState) -> tuple[int, TrainState, dict] | None:
        """(step, state, this host's data state) of the newest checkpoint that restores on every
        host, or None when there is none. Newer ones that fail are reported and set aside."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        failed: list[tuple[int, str]] = []
        tries = 2 if "://" in self.dir else 1  # a bucket: one retry, so a passing network error deletes nothing
        for step in steps:
            for _ in range(tries):
                try:
                    state, data = self.restore(step, target)
                    error = None
                    break
                except ResumeError:
                    raise
                except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint means: try an older one
                    state, data, error = None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            errors = [x for x in dist.allgather_json(error) if x]  # every host must have restored it
            if errors:
                failed.append((step, errors[0]))
                log.warning("%s: checkpoint %d cannot be restored (%s)", self.dir, step, errors[0])
                continue
            if failed:
                self._set_aside([s for s, _ in failed])
                log.warning(
                    "%s: resuming from step %d, the newest intact checkpoint; newer checkpoint(s) %s could "
                    "not be restored and were set aside",
                    self.dir,
                    step,
                    [s for s, _ in failed],
                )
            return step, state, data
        if failed:
            raise ResumeError(
                f"{self.dir}: no checkpoint can be restored: "
                + "; ".join(f"step {s}: {e}" for s, e in failed)
                + " (move the stage's checkpoint folder away to start the stage over)"
            )
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Move unreadable checkpoints out of the manager's sight (local: renamed to
        ``corrupt-<step>-<time>``, kept for inspection; in a bucket: deleted)."""
        if dist.is_main():
            for step in steps:
                path = f"{self.dir}/{step}"
                try:
                    if "://" in self.dir:
                        epath.Path(path).rmtree()
                    else:
                        os.rename(path, f"{self.dir}/corrupt-{step}-{int(time.time())}")
                except OSError as e:
                    log.warning("%s: could not set checkpoint %d aside (%s)", self.dir, step, e)
        dist.barrier("checkpoint-set-aside")
        self.manager.reload()

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

    remote, local = epath.Path(checkpoint_dir) / "logs", epath.Path(run_dir)
    if pull and (local / "metrics.jsonl").exists():
        return
    for name in LOG_FILES:
        src, dst = (remote / name, local / name) if pull else (local / name, remote / name)
        if src.exists():
            data = src.read_bytes()
            if "://" not in os.fspath(dst):  # a local file: through a temporary file and an atomic replace
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = f"{dst}.partial"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, dst)
            else:  # one object upload, which a bucket makes visible whole or not at all
                dst.write_bytes(data)


def pull_dataset(src: str, cache_root: str) -> str:
    """A local copy of the dataset folder ``src`` in a bucket (``gs://...``), made once under
    ``cache_root/<hash of src>`` (downloaded into a temporary folder, renamed when complete) and
    reused afterwards: the data loaders read local files (images by relative path). Every host
    makes its own copy. A later change in the bucket is not picked up: delete the cache folder."""

    dst = os.path.join(cache_root, hashlib.sha1(src.encode()).hexdigest()[:16])
    if os.path.isdir(dst):
        return dst
    fs, root = fsspec.core.url_to_fs(src)
    files = [f for f in fs.find(root) if not f.endswith("/")]
    if not files:
        raise FileNotFoundError(f"data.path: {src} holds no files")
    tmp = f"{dst}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for f in files:
        rel = os.path.relpath(f, root)
        if rel.startswith(".."):
            continue
        local = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with fs.open(f, "rb") as r, open(local, "wb") as w:
            shutil.copyfileobj(r, w, 1 << 22)
    try:
        os.replace(tmp, dst)
    except OSError:  # another process on this machine finished the same copy first
        if not os.path.isdir(dst):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("data: copied %d files of %s to %s", len(files), src, dst)
    return dst
