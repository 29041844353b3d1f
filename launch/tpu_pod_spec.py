"""What a TPU pod run is (:class:`Pod`: name, zone, project, accelerator, locations, the
commands each step runs on the workers) and the checks every user string passes before it
reaches a remote shell (validated, then quoted with :mod:`shlex`). Used by ``tpu_pod.py``;
standard library only."""

from __future__ import annotations

import dataclasses
import re
import shlex

RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5", "v5e": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
# On the workers (in double quotes or bare, never single-quoted, so the remote shell expands $HOME)
REMOTE_DIR = "$HOME/r1v2-jax"
VENV = "$HOME/r1v2-venv"

_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")  # TPU VM / queued resource names
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_PROJECT = re.compile(r"([a-z0-9][-a-z0-9.]*:)?[a-z][-a-z0-9]{0,61}[a-z0-9]")
_ACCELERATOR = re.compile(r"(v4|v5p|v5e|v6e)-[0-9]+")
_RUNTIME = re.compile(r"[a-z0-9][-a-z0-9._]*")
_GCS = re.compile(r"gs://[a-z0-9][a-z0-9._-]{1,221}[a-z0-9](/.*)?")
_OVERRIDE = re.compile(r"--config\.([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)=(.*)", re.DOTALL)
# keys the launcher sets itself on every worker (an override would break resuming)
_LAUNCHER_KEYS = ("run_dir", "checkpoint.dir", "data.path", "model.init", "progress")
# gcloud's wording when a zone has no TPUs to give (retried); quota errors are not capacity
_CAPACITY = re.compile(
    r"no more capacity|insufficient capacity|ZONE_RESOURCE_POOL_EXHAUSTED|stockout|"
    r"resource pool exhausted|RESOURCE_EXHAUSTED",
    re.IGNORECASE,
)


def _printable(field: str, value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{field}: control characters (newline, NUL, ...) are not allowed, got {value!r}")
    return value


def _matches(field: str, pattern: re.Pattern, value: str, what: str) -> str:
    if not pattern.fullmatch(value):
        raise ValueError(f"{field}: expected {what}, got {value!r}")
    return value


def check_override(ov: str) -> str:
    """A ``--config.KEY=VALUE`` override: a dotted key of identifiers, any printable value."""
    m = _OVERRIDE.fullmatch(_printable("override", ov))
    if not m:
        raise ValueError(
            f"after --, only --config.KEY=VALUE overrides are passed to r1v2 train (KEY dotted identifiers), got {ov!r}"
        )
    if m.group(1) in _LAUNCHER_KEYS:
        raise ValueError(f"override {ov!r}: config.{m.group(1)} is set by the launcher")
    return ov


def is_capacity_error(text: str) -> bool:
    return bool(_CAPACITY.search(text)) and "quota" not in text.lower()


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
        """Validate every field: most of them end up in a command line on the workers."""
        _matches(
            "--name", _NAME, self.name, "lowercase letters, digits and hyphens, starting with a letter (at most 63)"
        )
        _matches("--zone", _ZONE, self.zone, "a zone such as us-east5-a")
        _matches("--project", _PROJECT, self.project, "a Google Cloud project id")
        _matches("--accelerator", _ACCELERATOR, self.accelerator, "e.g. v5p-128, v4-32, v5e-16, v6e-64")
        if self.runtime:
            _matches("--runtime", _RUNTIME, self.runtime, "a TPU software version such as v2-alpha-tpuv5")
        _printable("--config", self.config)
        if (
            self.config.startswith("/")
            or ".." in self.config.split("/")
            or not self.config.endswith(".py")
            or self.config.startswith("-")
        ):
            raise ValueError(
                f"--config: expected a .py config file relative to the checkout (no '..'), got {self.config!r}"
            )
        _matches("--bucket", _GCS, _printable("--bucket", self.bucket), "a gs://BUCKET[/path] for checkpoints and logs")
        for field, v in (("--data", self.data), ("--model", self.model)):
            if v:
                _matches(field, _GCS, _printable(field, v), "a gs://BUCKET/path")
        self.overrides = tuple(check_override(ov) for ov in self.overrides)
        self.runtime = self.runtime or RUNTIME[self.accelerator.split("-")[0]]
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
        cmd = [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "create",
            self.name,
            f"--node-id={self.name}",
            *self.where,
            f"--accelerator-type={self.accelerator}",
            f"--runtime-version={self.runtime}",
        ]
        return cmd + (["--spot"] if self.spot else [])

    def queued_state(self) -> list[str]:
        return [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "describe",
            self.name,
            *self.where,
            "--format=value(state.state)",
        ]

    def delete(self) -> list[str]:
        return ["gcloud", "compute", "tpus", "queued-resources", "delete", self.name, *self.where, "--force", "--quiet"]

    def ssh(self, command: str, worker: str = "all") -> list[str]:
        return [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "ssh",
            self.name,
            *self.where,
            f"--worker={worker}",
            f"--command={command}",
        ]

    def scp(self, local: str, remote: str) -> list[str]:
        return [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "scp",
            local,
            f"{self.name}:{remote}",
            *self.where,
            "--worker=all",
        ]

    def setup(self, archive: str) -> list[list[str]]:
        install = " && ".join(
            [
                f'rm -rf "{REMOTE_DIR}" && mkdir -p "{REMOTE_DIR}"',
                f'tar -xzf "$HOME/r1v2-jax.tar.gz" -C "{REMOTE_DIR}"',
                f'python3 -m venv "{VENV}"',
                f'"{VENV}/bin/pip" install -q -e "{REMOTE_DIR}[tpu]"',
            ]
        )
        cmds = [
            ["git", "archive", "--format=tar.gz", "-o", archive, "HEAD"],
            self.scp(archive, "r1v2-jax.tar.gz"),
            self.ssh(install),
        ]
        copies = [
            f'gcloud storage rsync -r {shlex.quote(src)} "{dst}"'
            for src, dst in ((self.data, "$HOME/data"), (self.model, "$HOME/model"))
            if src
        ]
        if copies:
            cmds.append(self.ssh(" && ".join(['mkdir -p "$HOME/data" "$HOME/model"', *copies])))
        return cmds

    def train_command(self) -> str:
        # user strings quoted (shlex); the $HOME prefixes in double quotes so the worker expands them
        fixed = [
            f'"{VENV}/bin/r1v2" train',
            f'--config "{REMOTE_DIR}"/{shlex.quote(self.config)}',
            "--multihost",
            f'--config.run_dir="$HOME/runs"/{shlex.quote(self.name)}',
        ]
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

    def trainer_running(self) -> list[str]:
        return self.ssh('if pgrep -f "[r]1v2 train" > /dev/null; then echo running; else echo stopped; fi', worker="0")

    def logs(self) -> list[str]:
        # Follow the log until the trainer exits. "[r]1v2" keeps pgrep from matching this very
        # command's shell (whose command line holds the pattern); no trainer: print the log once.
        return self.ssh(
            'pid=$(pgrep -f "[r]1v2 train" | head -1); '
            'if [ -n "$pid" ]; then tail -n +1 -F "$HOME/train.log" --pid="$pid"; '
            'else cat "$HOME/train.log"; fi',
            worker="0",
        )

    def finished(self) -> list[str]:
        return ["gcloud", "storage", "ls", f"{self.checkpoint_dir}/logs/summary.json"]


# --- running commands -------------------------------------------------------------------------
