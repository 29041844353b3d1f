"""Kill -9 a training run at a random step of MPO and again of GRPO, resume: the final
parameters and the metrics log equal an uninterrupted run's, bit for bit."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from r1v2_jax.convert.safetensors_io import SafetensorsDir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = [
    "--config.sft.steps=40",
    "--config.rm.steps=3",
    "--config.mpo.pairs.threshold=0.5",
    "--config.mpo.steps=6",
    "--config.grpo.steps=6",
    "--config.checkpoint.every=2",
    "--config.data.synthetic_n=40",
    "--config.mpo.pairs.prompts=8",
    "--config.eval.prompts=4",
    "--config.grpo.group_size=4",
    "--config.grpo.max_new_tokens=12",
    "--config.data.batch_size=4",
    "--config.eval.max_new_tokens=12",
    "--config.progress=False",
]


pytestmark = pytest.mark.slow  # the fast lane (-m "not slow") skips this module


def _cmd(run_dir):
    return [sys.executable, "-m", "r1v2_jax.cli", "demo", "--out", run_dir, *OVERRIDES]


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f]


def _wait_for(run_dir, stage, step, proc, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {stage} step {step}: {proc.stderr.read()[-2000:]}")
        path = os.path.join(run_dir, "metrics.jsonl")
        if os.path.exists(path):
            try:
                if any(r.get("stage") == stage and r["step"] >= step for r in _rows(run_dir)):
                    return
            except json.JSONDecodeError:
                pass  # a row being written
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {stage} step {step}")


@pytest.mark.slow
def test_kill_and_resume_is_bitwise_identical(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    a = str(tmp_path / "a")
    r = subprocess.run(_cmd(a), capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]

    b = str(tmp_path / "b")
    rng = random.Random(0)
    for stage in ("mpo", "grpo"):
        proc = subprocess.Popen(_cmd(b), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        _wait_for(b, stage, rng.randint(1, 5), proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    r = subprocess.run(_cmd(b), capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]

    assert _rows(a) == _rows(b)
    assert {x["stage"] for x in _rows(a)} >= {"sft", "mpo", "grpo", "eval_grpo"}
    ea, eb = (
        SafetensorsDir(os.path.join(a, "export", "released")),
        SafetensorsDir(os.path.join(b, "export", "released")),
    )
    assert set(ea.keys()) == set(eb.keys())
    for k in ea.keys():
        assert ea.get(k).tobytes() == eb.get(k).tobytes(), k
