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
5. **run** does 1-4 and watches: when the slice is preempted or training dies, it deletes the
   slice, waits, and starts again from step 1 (up to ``--max-restarts``). It stops when the
   run's ``summary.json`` exists in the bucket.

``--dry-run`` prints every command instead of running it (one pass, as if the slice were new).
Only the standard library is used: the launcher runs on any machine with ``gcloud``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
import time

RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5", "v5e": "v2-alpha-tpuv5-lite",
           "v6e": "v2-alpha-tpuv6e"}
# On the workers (in double quotes or bare, never single-quoted, so the remote shell expands $HOME)
REMOTE_DIR = "$HOME/r1v2-jax"
VENV = "$HOME/r1v2-venv"


@dataclasses.dataclass
class Pod:
    name: str
    zone: str
    project: str
    accelerator: str
    config: str
    bucket: str
    data: str = ""
    model: str = ""
    runtime: str = ""
    spot: bool = False
    overrides: tuple[str, ...] = ()

    def __post_init__(self):
        family = self.accelerator.split("-")[0]
        if family not in RUNTIME or "-" not in self.accelerator:
            raise ValueError(f"--accelerator: expected e.g. v5p-128, v4-32, v5e-16, v6e-64, got {self.accelerator!r}")
        if not self.bucket.startswith("gs://"):
            raise ValueError(f"--bucket: expected a gs:// path for checkpoints and logs, got {self.bucket!r}")
        self.runtime = self.runtime or RUNTIME[family]
        self.bucket = self.bucket.rstrip("/")

    # -- paths -----------------------------------------------------------------------------
    @property
    def run_bucket(self) -> str:
        return f"{self.bucket}/{self.name}"

    @property
    def checkpoint_dir(self) -> str:
        return f"{self.run_bucket}/checkpoints"

    @property
    def where(self) -> list[str]:
        return [f"--zone={self.zone}", f"--project={self.project}"]

    # -- commands --------------------------------------------------------------------------
    def describe(self) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "describe", self.name, *self.where, "--format=value(state)"]

    def create(self) -> list[str]:
        cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", self.name, f"--node-id={self.name}",
               *self.where, f"--accelerator-type={self.accelerator}", f"--runtime-version={self.runtime}"]
        return cmd + (["--spot"] if self.spot else [])

    def queued_state(self) -> list[str]:
        return ["gcloud", "compute", "tpus", "queued-resources", "describe", self.name, *self.where,
                "--format=value(state.state)"]

    def delete(self) -> list[str]:
        return ["gcloud", "compute", "tpus", "queued-resources", "delete", self.name, *self.where, "--force",
                "--quiet"]

    def ssh(self, command: str, worker: str = "all") -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, *self.where, f"--worker={worker}",
                f"--command={command}"]

    def scp(self, local: str, remote: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{self.name}:{remote}", *self.where,
                "--worker=all"]

    def setup(self, archive: str) -> list[list[str]]:
        install = " && ".join([
            f'rm -rf "{REMOTE_DIR}" && mkdir -p "{REMOTE_DIR}"',
            f'tar -xzf "$HOME/r1v2-jax.tar.gz" -C "{REMOTE_DIR}"',
            f'python3 -m venv "{VENV}"',
            f'"{VENV}/bin/pip" install -q -e "{REMOTE_DIR}[tpu]"',
        ])
        cmds = [["git", "archive", "--format=tar.gz", "-o", archive, "HEAD"], self.scp(archive, "r1v2-jax.tar.gz"),
                self.ssh(install)]
        copies = [f'gcloud storage rsync -r {shlex.quote(src)} "{dst}"'
                  for src, dst in ((self.data, "$HOME/data"), (self.model, "$HOME/model")) if src]
        if copies:
            cmds.append(self.ssh(" && ".join(['mkdir -p "$HOME/data" "$HOME/model"', *copies])))
        return cmds

    def train_command(self) -> str:
        fixed = [f'"{VENV}/bin/r1v2" train', f'--config "{REMOTE_DIR}/{self.config}"', "--multihost",
                 f'--config.run_dir="$HOME/runs/{self.name}"']
        if self.data:
            fixed.append('--config.data.path="$HOME/data"')
        if self.model:
            fixed.append('--config.model.init="$HOME/model"')
        args = [f"--config.checkpoint.dir={self.checkpoint_dir}", "--config.progress=False", *self.overrides]
        line = " ".join(fixed + [shlex.quote(a) for a in args])
        # every worker runs the same command; worker logs stay on each VM, worker 0's is streamed
        return f'cd "{REMOTE_DIR}" && nohup {line} > "$HOME/train.log" 2>&1 & echo started'

    def start(self) -> list[str]:
        return self.ssh(self.train_command())

    def logs(self) -> list[str]:
        # Follow the log until the trainer exits. "[r]1v2" keeps pgrep from matching this very
        # command's shell (whose command line holds the pattern); no trainer: print the log once.
        return self.ssh('pid=$(pgrep -f "[r]1v2 train" | head -1); '
                        'if [ -n "$pid" ]; then tail -n +1 -F "$HOME/train.log" --pid="$pid"; '
                        'else cat "$HOME/train.log"; fi', worker="0")

    def finished(self) -> list[str]:
        return ["gcloud", "storage", "ls", f"{self.checkpoint_dir}/logs/summary.json"]


# --- running commands -------------------------------------------------------------------------

class Shell:
    def __init__(self, dry_run: bool, out=sys.stdout):
        self.dry_run, self.out = dry_run, out

    def run(self, cmd: list[str], check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
        print("+ " + " ".join(shlex.quote(c) for c in cmd), file=self.out, flush=True)
        if self.dry_run:
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.run(cmd, check=check, text=True, capture_output=capture)


def state_of(pod: Pod, sh: Shell) -> str:
    """READY / CREATING / PREEMPTED / ... of the TPU VM, or NOT_FOUND."""
    if sh.dry_run:
        sh.run(pod.describe(), check=False)
        return "NOT_FOUND"
    r = sh.run(pod.describe(), check=False, capture=True)
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "NOT_FOUND"


def create(pod: Pod, sh: Shell, poll: float = 30.0) -> bool:
    """Make sure the slice is READY; True when it was (re)created and needs setup."""
    state = state_of(pod, sh)
    if state == "READY":
        print(f"reusing TPU VM {pod.name} (READY)", file=sh.out)
        return False
    if state != "NOT_FOUND":
        sh.run(pod.delete(), check=False)
    sh.run(pod.create())
    while not sh.dry_run:
        r = sh.run(pod.queued_state(), check=False, capture=True)
        s = r.stdout.strip()
        if s == "ACTIVE":
            break
        if s in ("FAILED", "SUSPENDED"):
            raise RuntimeError(f"queued resource {pod.name}: {s}")
        time.sleep(poll)
    return True


def setup(pod: Pod, sh: Shell) -> None:
    for cmd in pod.setup(f"/tmp/{pod.name}-r1v2-jax.tar.gz"):
        sh.run(cmd)


def run(pod: Pod, sh: Shell, max_restarts: int, poll: float = 60.0) -> int:
    for attempt in range(max_restarts + 1):
        create(pod, sh)
        setup(pod, sh)  # also after a reuse: the checkout may have changed
        sh.run(pod.start())
        r = sh.run(pod.logs(), check=False)  # returns when training exits or the slice goes away
        if sh.dry_run:
            sh.run(pod.finished(), check=False)
            return 0
        if sh.run(pod.finished(), check=False, capture=True).returncode == 0:
            print(f"{pod.name}: finished (summary.json in {pod.checkpoint_dir}/logs)", file=sh.out)
            return 0
        print(f"{pod.name}: training stopped (log stream exit {r.returncode}, slice {state_of(pod, sh)}); "
              f"restart {attempt + 1} of {max_restarts} from the latest checkpoint", file=sh.out)
        sh.run(pod.delete(), check=False)
        time.sleep(poll)
    print(f"{pod.name}: gave up after {max_restarts} restarts", file=sh.out)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1:]
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
    p.add_argument("--dry-run", action="store_true", help="print every command; run nothing")
    a = p.parse_args(argv)
    for ov in overrides:
        if not ov.startswith("--config."):
            p.error(f"after --, only --config.KEY=VALUE overrides are passed to r1v2 train, got {ov!r}")
    try:
        pod = Pod(a.name, a.zone, a.project, a.accelerator, a.config, a.bucket, a.data, a.model, a.runtime, a.spot,
                  tuple(overrides))
    except ValueError as e:
        p.error(str(e))
    sh = Shell(a.dry_run)
    if a.action == "run":
        return run(pod, sh, a.max_restarts)
    if a.action == "create":
        create(pod, sh)
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
