#!/usr/bin/env python3
"""Run an r1v2-jax experiment on a Cloud TPU pod slice, one command, resuming after preemption.

    python launch/tpu_pod.py run --name r1v2-grpo --zone us-east5-a --project P \\
        --accelerator v5p-128 --config configs/grpo_38b.py \\
        --bucket gs://my-bucket/r1v2 --data gs://my-bucket/data/rl --model gs://my-bucket/ckpt/r1v2-38b \\
        [--spot] [--dry-run] [-- --config.grpo.steps=500 ...]

Steps (each a subcommand too: create, setup, start, logs, status, delete):

1. **create**: a queued resource for the slice (``gcloud compute tpus queued-resources create``),
   or reuse the TPU VM if it exists and is READY; wait until it is ACTIVE.
2. **setup** on every worker (``--worker=all``): copy this checkout (``git archive`` of HEAD),
   make a venv, ``pip install -e .[tpu]``, and copy the data and the model to local disk
   (``gcloud storage rsync``).
3. **start** on every worker: ``r1v2 train --multihost`` (``jax.distributed.initialize()``
   finds the pod's hosts itself) with ``run_dir`` on local disk and ``checkpoint.dir`` in the
   bucket; the trainer resumes from the newest checkpoint there and keeps its metrics log
   beside it, so a new slice continues exactly where the old one was preempted.
4. **logs**: stream worker 0's log until training ends.
5. **run** does 1-4 and watches. It stops with exit 0 when the run's ``summary.json`` exists
   in the bucket. Only a preemption (the slice is gone or no longer READY: while creating,
   installing, or training) or a capacity error from ``create`` is retried: the slice is
   deleted, and after a pause everything starts again from step 1 (up to
   ``--max-restarts``); the trainer resumes from the newest checkpoint. Anything else (a
   command failing on a healthy slice, training exiting while the slice is READY, a
   permission or quota error) stops with exit 1 and the last lines of the log. The same
   failure ``--max-same-failures`` times in a row (same kind, same message, same last log
   line: no progress) also stops.

Every user string that reaches a worker's shell (config path, run name, overrides, data and
model locations) is validated here and quoted with ``shlex``; ``$HOME`` stays outside quotes
so the worker's shell expands it.

``--dry-run`` prints every command instead of running it (one pass, as if the slice were new).
Only the standard library is used: the launcher runs on any machine with ``gcloud``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import shlex
import subprocess
import sys
import time
from pathlib import Path

# the launcher is a script: its sibling module sits beside it
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tpu_pod_spec import Pod, is_capacity_error  # noqa: E402


class Shell:
    def __init__(self, dry_run: bool, out=sys.stdout):
        self.dry_run, self.out = dry_run, out

    def run(self, cmd: list[str], check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
        print("+ " + " ".join(shlex.quote(c) for c in cmd), file=self.out, flush=True)
        if self.dry_run:
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.run(cmd, check=check, text=True, capture_output=capture)

    def stream(self, cmd: list[str], keep: int = 20) -> tuple[int, list[str]]:
        """Run ``cmd`` printing its output as it comes; (exit code, its last ``keep`` lines)."""
        print("+ " + " ".join(shlex.quote(c) for c in cmd), file=self.out, flush=True)
        if self.dry_run:
            return 0, []
        tail: collections.deque = collections.deque(maxlen=keep)
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
            for line in p.stdout:
                print(line, end="", file=self.out, flush=True)
                tail.append(line.rstrip("\n"))
        return p.returncode, list(tail)


@dataclasses.dataclass(frozen=True)
class Failure(Exception):
    """Why an attempt ended: ``kind`` is preempted | capacity (retried) or error (not retried)."""

    kind: str
    detail: str
    last_log_line: str = ""

    @property
    def retryable(self) -> bool:
        return self.kind in ("preempted", "capacity")

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}" + (f" (last log line: {self.last_log_line})" if self.last_log_line else "")


def state_of(pod: Pod, sh: Shell) -> str:
    """READY / CREATING / PREEMPTED / ... of the TPU VM, or NOT_FOUND."""
    if sh.dry_run:
        sh.run(pod.describe(), check=False)
        return "NOT_FOUND"
    r = sh.run(pod.describe(), check=False, capture=True)
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "NOT_FOUND"


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def create(pod: Pod, sh: Shell, poll: float = 30.0) -> bool:
    """Make sure the slice is READY; True when it was (re)created and needs setup. Raises
    :class:`Failure` (capacity for gcloud's no-capacity answers, else error)."""
    state = state_of(pod, sh)
    if state == "READY":
        print(f"reusing TPU VM {pod.name} (READY)", file=sh.out)
        return False
    if state != "NOT_FOUND":
        sh.run(pod.delete(), check=False)
    r = sh.run(pod.create(), check=False, capture=True)
    if r.returncode != 0:
        text = f"{r.stdout or ''}\n{r.stderr or ''}"
        print(text.strip(), file=sh.out)
        kind = "capacity" if is_capacity_error(text) else "error"
        raise Failure(kind, f"creating queued resource {pod.name} failed: {_last_line(text)}")
    while not sh.dry_run:
        s = sh.run(pod.queued_state(), check=False, capture=True).stdout.strip()
        if s == "ACTIVE":
            break
        if s == "SUSPENDED":
            raise Failure("preempted", f"queued resource {pod.name} SUSPENDED")
        if s == "FAILED":
            raise Failure("error", f"queued resource {pod.name} FAILED")
        time.sleep(poll)
    return True


def setup(pod: Pod, sh: Shell) -> None:
    for cmd in pod.setup(f"/tmp/{pod.name}-r1v2-jax.tar.gz"):
        sh.run(cmd)


def follow(pod: Pod, sh: Shell, poll: float = 60.0) -> tuple[int, list[str]]:
    """Stream worker 0's log until training ends; a dropped stream while the trainer still runs
    on a READY slice is followed again."""
    while True:
        rc, tail = sh.stream(pod.logs())
        if sh.dry_run or rc == 0 or state_of(pod, sh) != "READY":
            return rc, tail
        r = sh.run(pod.trainer_running(), check=False, capture=True)
        if "running" not in r.stdout.split():
            return rc, tail
        print(f"{pod.name}: the log stream ended (exit {rc}) while training runs; following again", file=sh.out)
        time.sleep(poll)


def attempt_once(pod: Pod, sh: Shell, poll: float) -> Failure | None:
    """One pass of create -> setup -> start -> follow; None when the run finished."""
    try:
        create(pod, sh, poll=poll / 2)
        setup(pod, sh)  # also after a reuse: the checkout may have changed
        sh.run(pod.start())
        rc, tail = follow(pod, sh, poll)
    except Failure as f:
        return f
    except subprocess.CalledProcessError as e:  # setup or start failed: preempted, or a real error?
        state = state_of(pod, sh)
        what = " ".join(e.cmd[:6]) + (" ..." if len(e.cmd) > 6 else "")
        if state != "READY":
            return Failure("preempted", f"slice {state} while running: {what}")
        return Failure(
            "error",
            f"command failed on a READY slice (exit {e.returncode}): {what}: {_last_line(e.stderr or e.stdout or '')}",
        )
    if sh.dry_run:
        sh.run(pod.finished(), check=False)
        return None
    if sh.run(pod.finished(), check=False, capture=True).returncode == 0:
        return None
    state = state_of(pod, sh)
    last = tail[-1] if tail else ""
    if state == "READY":
        return Failure("error", f"training exited (log stream exit {rc}) on a READY slice without finishing", last)
    return Failure("preempted", f"slice {state} during training", last)


def run(pod: Pod, sh: Shell, max_restarts: int, poll: float = 60.0, max_same: int = 3) -> int:
    """Attempts until the run finishes; only preemptions and capacity errors are retried, and
    the same failure ``max_same`` times in a row stops (see the module docstring)."""
    previous, same = None, 0
    for attempt in range(max_restarts + 1):
        failure = attempt_once(pod, sh, poll)
        if failure is None:
            if not sh.dry_run:
                print(f"{pod.name}: finished (summary.json in {pod.checkpoint_dir}/logs)", file=sh.out)
            return 0
        print(f"{pod.name}: {failure}", file=sh.out)
        if not failure.retryable:
            print(
                f"{pod.name}: not retried (only preemption and capacity errors are); the slice is kept for a "
                "look (`logs`, `delete`)",
                file=sh.out,
            )
            return 1
        same = same + 1 if failure == previous else 1
        previous = failure
        if same >= max_same:
            print(f"{pod.name}: the same failure {same} times in a row, giving up", file=sh.out)
            return 1
        if attempt == max_restarts:
            break
        print(f"{pod.name}: restart {attempt + 1} of {max_restarts} from the latest checkpoint", file=sh.out)
        sh.run(pod.delete(), check=False)
        time.sleep(poll)
    print(f"{pod.name}: gave up after {max_restarts} restarts", file=sh.out)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["run", "create", "setup", "start", "logs", "status", "delete"])
    p.add_argument("--name", required=True, help="TPU VM / queued resource name (also the run's name)")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", required=True)
    p.add_argument("--accelerator", default="v5p-128")
    p.add_argument("--runtime", default="", help="TPU software version (default: by accelerator family)")
    p.add_argument("--config", default="configs/grpo_38b.py", help="experiment config, relative to the checkout")
    p.add_argument("--bucket", required=True, help="gs:// prefix for checkpoints and logs")
    p.add_argument("--data", default="", help="gs:// data folder copied to every worker (config data.path)")
    p.add_argument("--model", default="", help="gs:// converted checkpoint copied to every worker (model.init)")
    p.add_argument("--spot", action="store_true", help="spot capacity (preemptible; `run` restarts)")
    p.add_argument("--max-restarts", type=int, default=20)
    p.add_argument(
        "--max-same-failures",
        type=int,
        default=3,
        help="stop when the same failure (no progress) happens this many times in a row",
    )
    p.add_argument("--dry-run", action="store_true", help="print every command; run nothing")
    a = p.parse_args(argv)
    try:
        pod = Pod(
            a.name,
            a.zone,
            a.project,
            a.accelerator,
            a.config,
            a.bucket,
            a.data,
            a.model,
            a.runtime,
            a.spot,
            tuple(overrides),
        )
    except ValueError as e:
        p.error(str(e))
    sh = Shell(a.dry_run)
    if a.action == "run":
        return run(pod, sh, a.max_restarts, max_same=a.max_same_failures)
    if a.action == "create":
        try:
            create(pod, sh)
        except Failure as f:
            print(f"{pod.name}: {f}", file=sh.out)
            return 1
    elif a.action == "setup":
        setup(pod, sh)
    elif a.action == "start":
        sh.run(pod.start())
    elif a.action == "logs":
        sh.run(pod.logs(), check=False)
    elif a.action == "status":
        print(state_of(pod, sh), file=sh.out)
    elif a.action == "delete":
        sh.run(pod.delete())
    return 0


if __name__ == "__main__":
    sys.exit(main())
