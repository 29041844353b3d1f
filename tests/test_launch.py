"""launch/tpu_pod.py: the dry run prints every command it would run, and the training
command it starts on each worker is a valid `r1v2 train` invocation of the config."""

import importlib.util
import io
import os
import re
import shlex
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launcher():
    spec = importlib.util.spec_from_file_location("tpu_pod", os.path.join(ROOT, "launch", "tpu_pod.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tpu_pod"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


ARGS = [
    "--name",
    "r1v2-grpo",
    "--zone",
    "us-east5-a",
    "--project",
    "proj",
    "--accelerator",
    "v5p-128",
    "--config",
    "configs/grpo_38b.py",
    "--bucket",
    "gs://bkt/r1v2/",
    "--data",
    "gs://bkt/data/rl",
    "--model",
    "gs://bkt/ckpt/38b",
    "--spot",
    "--dry-run",
]


def _dry(action, *extra):
    out = io.StringIO()
    with redirect_stdout(out):
        rc = _launcher().main([action, *ARGS, *extra])
    return rc, [shlex.split(line[2:]) for line in out.getvalue().splitlines() if line.startswith("+ ")]


def test_dry_run_prints_the_whole_sequence():
    rc, cmds = _dry("run", "--", "--config.grpo.steps=500", "--config.data.batch_size=64")
    assert rc == 0
    where = ["--zone=us-east5-a", "--project=proj"]
    heads = [c[:5] for c in cmds]
    assert heads == [
        ["gcloud", "compute", "tpus", "tpu-vm", "describe"],
        ["gcloud", "compute", "tpus", "queued-resources", "create"],
        ["git", "archive", "--format=tar.gz", "-o", "/tmp/r1v2-grpo-r1v2-jax.tar.gz"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],  # install
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],  # data + model to local disk
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],  # start training
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],  # stream worker 0's log
        ["gcloud", "storage", "ls", "gs://bkt/r1v2/r1v2-grpo/checkpoints/logs/summary.json"],
    ]
    create = cmds[1]
    assert create[5] == "r1v2-grpo" and "--node-id=r1v2-grpo" in create and "--spot" in create
    assert "--accelerator-type=v5p-128" in create and "--runtime-version=v2-alpha-tpuv5" in create
    assert all(w in create for w in where)
    assert cmds[3][-1] == "--worker=all" and cmds[3][6] == "r1v2-grpo:r1v2-jax.tar.gz"
    # the remote commands, as the worker's shell would split them (with $HOME expanded: never single-quoted)
    remote = [shlex.split(c[-1][len("--command=") :].replace("$HOME", "/home/u")) for c in cmds[4:8]]
    assert "--worker=all" in cmds[4]
    assert remote[0][remote[0].index("install") :][:4] == ["install", "-q", "-e", "/home/u/r1v2-jax[tpu]"]
    copy = " ".join(remote[1])
    assert "gcloud storage rsync -r gs://bkt/data/rl /home/u/data" in copy
    assert "gcloud storage rsync -r gs://bkt/ckpt/38b /home/u/model" in copy
    assert "--worker=all" in cmds[6]
    argv = remote[2][remote[2].index("nohup") + 1 : remote[2].index(">")]
    assert remote[2][remote[2].index(">") + 1] == "/home/u/train.log"
    assert argv[:5] == [
        "/home/u/r1v2-venv/bin/r1v2",
        "train",
        "--config",
        "/home/u/r1v2-jax/configs/grpo_38b.py",
        "--multihost",
    ]
    assert "--config.checkpoint.dir=gs://bkt/r1v2/r1v2-grpo/checkpoints" in argv
    assert argv[-2:] == ["--config.grpo.steps=500", "--config.data.batch_size=64"]
    assert cmds[7][-2] == "--worker=0" and "tail" in cmds[7][-1]
    # the log follower waits on the trainer's pid; its pgrep pattern must not match its own shell
    follow = cmds[7][-1].removeprefix("--command=")
    pattern = re.search(r'pgrep -f "([^"]+)"', follow).group(1)
    assert re.search(pattern, "/home/u/r1v2-venv/bin/python /home/u/r1v2-venv/bin/r1v2 train --config c.py")
    assert not re.search(pattern, f"bash -c {follow}")

    # the worker command is a valid `r1v2 train` call: its overrides name real keys of the config
    from r1v2_jax.train.config_files import load_config

    overrides = [a for a in argv if a.startswith("--config.")]
    cfg = load_config(os.path.join(ROOT, "configs", "grpo_38b.py"), overrides)
    assert cfg.checkpoint.dir == "gs://bkt/r1v2/r1v2-grpo/checkpoints" and cfg.data.path == "/home/u/data"
    assert cfg.model.init == "/home/u/model" and cfg.grpo.steps == 500


def test_each_step_alone_and_bad_input():
    rc, cmds = _dry("delete")
    assert rc == 0 and cmds[0][3:5] == ["queued-resources", "delete"]
    rc, cmds = _dry("start")
    assert len(cmds) == 1 and '/r1v2-venv/bin/r1v2" train --config' in cmds[0][-1]
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit):
        _launcher().main(["run", *[a if a != "v5p-128" else "h100-8" for a in ARGS]])
    assert "--accelerator" in err.getvalue()
    with redirect_stderr(err), pytest.raises(SystemExit):
        _launcher().main(["run", *ARGS, "--", "--steps=3"])
    assert "only --config.KEY=VALUE" in err.getvalue()
    with redirect_stderr(err), pytest.raises(SystemExit):
        _launcher().main(["run", *[a if a != "gs://bkt/r1v2/" else "/local/dir" for a in ARGS]])
    assert "--bucket" in err.getvalue()


def test_log_follower_returns_when_the_trainer_exits(tmp_path):
    """The worker-0 log command, run by a real shell: it prints the log while a process named
    like the trainer runs and returns once that process exits (how `run` notices the end)."""
    import shutil
    import subprocess
    import threading
    import time

    if not shutil.which("pgrep"):
        pytest.skip("pgrep not installed")
    rc, cmds = _dry("logs")
    follow = cmds[-1][-1].removeprefix("--command=")
    (tmp_path / "train.log").write_text("step 1\n")
    env = dict(os.environ, HOME=str(tmp_path))
    # a stand-in trainer: its command line reads ".../r1v2 train" as the real one's does
    fake = tmp_path / "bin" / "r1v2"
    fake.parent.mkdir()
    fake.write_text("#!/bin/bash\nsleep 3\n")
    fake.chmod(0o755)
    trainer = subprocess.Popen([str(fake), "train"], env=env)
    # reap it as soon as it exits (on a worker, init does): `tail --pid` takes a zombie for alive
    threading.Thread(target=trainer.wait, daemon=True).start()
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        r = subprocess.run(["bash", "-c", follow], env=env, capture_output=True, text=True, timeout=30)
        waited = time.monotonic() - t0
    finally:
        trainer.kill()
    assert rc == 0 and r.returncode == 0 and "step 1" in r.stdout, r.stderr
    assert 1.0 < waited < 20, waited  # followed the trainer until it ended, then stopped
    # no trainer running: the log once, no waiting
    r = subprocess.run(["bash", "-c", follow], env=env, capture_output=True, text=True, timeout=10)
    assert r.returncode == 0 and r.stdout == "step 1\n"


# --- user strings reaching the workers' shell ------------------------------------------------


def _pod(**kw):
    args = dict(
        name="r1v2-grpo",
        zone="us-east5-a",
        project="proj",
        accelerator="v5p-128",
        config="configs/grpo_38b.py",
        bucket="gs://bkt/r1v2",
        data="gs://bkt/data/rl",
        model="",
    )
    args.update(kw)
    return _launcher().Pod(**args)


@pytest.mark.parametrize(
    "field,value,msg",
    [
        ("name", "r1v2$(id)", "--name"),
        ("name", "R1V2_grpo", "--name"),
        ("name", "a" * 64, "--name"),
        ("zone", "us-east5-a;reboot", "--zone"),
        ("project", "p'oj", "--project"),
        ("accelerator", "v5p-128 --x", "--accelerator"),
        ("runtime", "v2-alpha-tpuv5 && x", "--runtime"),
        ("config", "/etc/passwd.py", "--config"),
        ("config", "../outside.py", "--config"),
        ("config", "configs/run.sh", "--config"),
        ("config", "configs/a\nb.py", "--config"),
        ("bucket", "gs://b$(id)/x", "--bucket"),
        ("bucket", "/local/dir", "--bucket"),
        ("data", "gs://bkt/d\n", "--data"),
        ("model", "http://x/y", "--model"),
        ("overrides", ("--config.a;b=1",), "KEY dotted"),
        ("overrides", ("--steps=3",), "only --config.KEY=VALUE"),
        ("overrides", ("--config.run_dir=/tmp/x",), "set by the launcher"),
        ("overrides", ("--config.checkpoint.dir=gs://other",), "set by the launcher"),
        ("overrides", ("--config.grpo.steps=5\nrm -rf ~",), "control characters"),
    ],
)
def test_user_strings_are_validated(field, value, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        _pod(**{field: value})


def test_worker_command_passes_user_strings_verbatim_through_a_real_shell(tmp_path):
    """The start command run by bash as on a worker: the stand-in r1v2 receives every user
    string as one argument, unchanged, and nothing in them is executed."""
    import subprocess
    import time

    home = tmp_path / "home"
    (home / "r1v2-jax").mkdir(parents=True)
    (home / "r1v2-venv" / "bin").mkdir(parents=True)
    fake = home / "r1v2-venv" / "bin" / "r1v2"
    fake.write_text('#!/bin/bash\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$HOME/argv.txt"\n')
    fake.chmod(0o755)
    marker = tmp_path / "executed"
    config = f"configs/x $(touch {marker}).py"
    overrides = (f"--config.grpo.note=a b\"c'$(touch {marker}) `touch {marker}` $HOME;",)
    pod = _pod(config=config, overrides=overrides)
    r = subprocess.run(
        ["bash", "-c", pod.train_command()],
        env=dict(os.environ, HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0 and r.stdout.strip() == "started", r.stderr
    for _ in range(100):
        if (home / "argv.txt").exists() and (home / "argv.txt").read_text().endswith("\n"):
            break
        time.sleep(0.1)
    argv = (home / "argv.txt").read_text().splitlines()
    assert not marker.exists()  # nothing was executed
    assert argv[:3] == ["train", "--config", f"{home}/r1v2-jax/{config}"]
    assert f"--config.run_dir={home}/runs/r1v2-grpo" in argv and "--config.data.path=" + f"{home}/data" in argv
    assert argv[-1] == overrides[0]


# --- what is retried -------------------------------------------------------------------------


class FakeShell:
    """Answers the launcher's gcloud calls from a script: ``script(kind, n)`` -> (rc, stdout, stderr)
    for the n-th call of that kind; records the kinds called."""

    def __init__(self, script):
        self.script, self.dry_run, self.out = script, False, io.StringIO()
        self.calls: list[str] = []

    @staticmethod
    def kind(cmd):
        text = " ".join(cmd)
        if cmd[0] == "git":
            return "archive"
        if "tpu-vm describe" in text:
            return "describe"
        if "queued-resources create" in text:
            return "create"
        if "queued-resources describe" in text:
            return "queued"
        if "queued-resources delete" in text:
            return "delete"
        if "storage ls" in text:
            return "finished"
        if "tpu-vm scp" in text:
            return "scp"
        if "nohup" in text:
            return "start"
        if "echo running" in text:
            return "running"
        if "tail -n" in text:
            return "logs"
        return "setup"

    def _answer(self, cmd):
        k = self.kind(cmd)
        n = self.calls.count(k)
        self.calls.append(k)
        return self.script(k, n)

    def run(self, cmd, check=True, capture=False):
        import subprocess

        rc, out, err = self._answer(cmd)
        if check and rc:
            raise subprocess.CalledProcessError(rc, cmd, out, err)
        return subprocess.CompletedProcess(cmd, rc, out, err)

    def stream(self, cmd, keep=20):
        rc, out, _ = self._answer(cmd)
        return rc, out.splitlines()


def _script(
    describe=lambda n: "NOT_FOUND",
    create=lambda n: (0, "", ""),
    logs=lambda n: (0, "step 1", ""),
    finished=lambda n: 1,
    setup=lambda n: 0,
):
    def answer(kind, n):
        if kind == "describe":
            s = describe(n)
            return (0, s + "\n", "") if s != "NOT_FOUND" else (1, "", "NOT_FOUND")
        if kind == "create":
            return create(n)
        if kind == "queued":
            return 0, "ACTIVE\n", ""
        if kind == "logs":
            return logs(n)
        if kind == "finished":
            return finished(n), "", ""
        if kind == "setup":
            return setup(n), "", "pip: no matching distribution"
        return 0, "", ""

    return answer


def _run(script, max_restarts=10):
    sh = FakeShell(script)
    rc = _launcher().run(_pod(), sh, max_restarts, poll=0)
    return rc, sh


def test_training_failure_on_a_healthy_slice_is_not_retried():
    rc, sh = _run(
        _script(
            describe=lambda n: "NOT_FOUND" if n == 0 else "READY", logs=lambda n: (0, "Traceback\nValueError: boom", "")
        )
    )
    assert rc == 1 and sh.calls.count("create") == 1 and "delete" not in sh.calls
    assert "not retried" in sh.out.getvalue() and "ValueError: boom" in sh.out.getvalue()
    # an install that fails on a READY slice is not retried either
    rc, sh = _run(_script(describe=lambda n: "NOT_FOUND" if n == 0 else "READY", setup=lambda n: 1))
    assert rc == 1 and sh.calls.count("create") == 1 and "start" not in sh.calls


def test_preemption_is_retried_and_the_run_finishes():
    rc, sh = _run(
        _script(
            describe=lambda n: "PREEMPTED" if n in (1, 2) else "NOT_FOUND",
            logs=lambda n: (255, "step 3", "") if n == 0 else (0, "step 9", ""),
            finished=lambda n: 0 if n == 1 else 1,
        )
    )
    assert rc == 0 and sh.calls.count("create") == 2 and sh.calls.count("delete") == 1
    assert sh.calls.count("setup") == 4  # reinstalled on the new slice (install + data, twice)


def test_capacity_errors_are_retried_other_create_errors_are_not():
    no_capacity = (
        1,
        "",
        "ERROR: (gcloud.compute.tpus.queued-resources.create) There is no more capacity in the zone us-east5-a",
    )
    rc, sh = _run(_script(create=lambda n: no_capacity if n == 0 else (0, "", ""), finished=lambda n: 0))
    assert rc == 0 and sh.calls.count("create") == 2
    for err in (
        "ERROR: PERMISSION_DENIED: the caller does not have permission",
        "ERROR: RESOURCE_EXHAUSTED: Quota 'TPUV5P_CHIPS' exceeded. Limit: 8.0",
    ):
        rc, sh = _run(_script(create=lambda n, e=err: (1, "", e)))
        assert rc == 1 and sh.calls.count("create") == 1 and "not retried" in sh.out.getvalue()


def test_the_same_failure_repeating_stops():
    # preempted three times at the same step: no progress, stop (well before --max-restarts)
    describe = lambda n: "NOT_FOUND" if n % 3 == 0 else "PREEMPTED"  # noqa: E731
    rc, sh = _run(_script(describe=describe, logs=lambda n: (255, "step 7", "")))
    assert rc == 1 and sh.calls.count("create") == 3 and "same failure 3 times" in sh.out.getvalue()
    # preempted while making progress: retried until it finishes
    rc, sh = _run(_script(describe=describe, logs=lambda n: (255, f"step {n}", ""), finished=lambda n: int(n < 4)))
    assert rc == 0 and sh.calls.count("create") == 5
    # capacity errors with the same message, over and over
    rc, sh = _run(_script(create=lambda n: (1, "", "no more capacity in the zone")))
    assert rc == 1 and sh.calls.count("create") == 3
