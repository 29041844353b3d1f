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


ARGS = ["--name", "r1v2-grpo", "--zone", "us-east5-a", "--project", "proj", "--accelerator", "v5p-128",
        "--config", "configs/grpo_38b.py", "--bucket", "gs://bkt/r1v2/", "--data", "gs://bkt/data/rl",
        "--model", "gs://bkt/ckpt/38b", "--spot", "--dry-run"]


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
    assert heads == [["gcloud", "compute", "tpus", "tpu-vm", "describe"],
                     ["gcloud", "compute", "tpus", "queued-resources", "create"],
                     ["git", "archive", "--format=tar.gz", "-o", "/tmp/r1v2-grpo-r1v2-jax.tar.gz"],
                     ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
                     ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],  # install
                     ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],  # data + model to local disk
                     ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],  # start training
                     ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],  # stream worker 0's log
                     ["gcloud", "storage", "ls", "gs://bkt/r1v2/r1v2-grpo/checkpoints/logs/summary.json"]]
    create = cmds[1]
    assert create[5] == "r1v2-grpo" and "--node-id=r1v2-grpo" in create and "--spot" in create
    assert "--accelerator-type=v5p-128" in create and "--runtime-version=v2-alpha-tpuv5" in create
    assert all(w in create for w in where)
    assert cmds[3][-1] == "--worker=all" and cmds[3][6] == "r1v2-grpo:r1v2-jax.tar.gz"
    # the remote commands, as the worker's shell would split them (with $HOME expanded: never single-quoted)
    remote = [shlex.split(c[-1][len("--command="):].replace("$HOME", "/home/u")) for c in cmds[4:8]]
    assert "--worker=all" in cmds[4]
    assert remote[0][remote[0].index("install"):][:4] == ["install", "-q", "-e", "/home/u/r1v2-jax[tpu]"]
    copy = " ".join(remote[1])
    assert "gcloud storage rsync -r gs://bkt/data/rl /home/u/data" in copy
    assert "gcloud storage rsync -r gs://bkt/ckpt/38b /home/u/model" in copy
    assert "--worker=all" in cmds[6]
    argv = remote[2][remote[2].index("nohup") + 1:remote[2].index(">")]
    assert remote[2][remote[2].index(">") + 1] == "/home/u/train.log"
    assert argv[:5] == ["/home/u/r1v2-venv/bin/r1v2", "train", "--config", "/home/u/r1v2-jax/configs/grpo_38b.py",
                        "--multihost"]
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
