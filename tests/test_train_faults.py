"""Training under faults (issue 17, points 4 and 6): a corrupt newest checkpoint, a partial last
line in metrics.jsonl, a crash while the log is cut back, and runaway updates. The resumable
loop runs a toy state here (no model), so these take seconds."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from r1v2_jax.train import metrics_log
from r1v2_jax.train.checkpoints import ResumeError
from r1v2_jax.train.loop import TrainingDiverged, run_loop
from r1v2_jax.train.metrics_log import MetricsLog
from r1v2_jax.train.run import Run
from r1v2_jax.train.state import OptimConfig, TrainState, apply_gradients, init_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(run_dir, every=2, keep=2):
    return Run(
        model_config=None,
        tokenizer=None,
        builder=None,
        run_dir=str(run_dir),
        metrics=MetricsLog(str(run_dir)),
        checkpoint_every=every,
        keep=keep,
        async_checkpoints=False,
        progress=False,
    )


def _state():
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params={"w": jnp.arange(4, dtype=jnp.float32)},
        opt_state={},
        rng=jax.random.key_data(jax.random.key(0)),
        bco_delta=jnp.zeros((), jnp.float32),
        bco_count=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
    )


@jax.jit
def _toy_update(state):
    return state.replace(step=state.step + 1, params={"w": state.params["w"] * 1.5 + state.step})


def _toy_step(state, batch):
    state = _toy_update(state)
    return state, {"loss": float(state.params["w"].sum()), "step_ok": 1.0}


def _train(run_dir, steps):
    run = _run(run_dir)
    try:
        return run_loop(run, "toy", _state(), steps, None, _toy_step)
    finally:
        run.metrics.close()


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f]


def _corrupt(step_dir):
    """Cut every data file of an orbax checkpoint short (what a full disk or a broken copy leaves)."""
    n = 0
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for f in files:
            p = os.path.join(root, f)
            if "commit_success" not in f and os.path.getsize(p) > 0:
                with open(p, "r+b") as fh:
                    fh.truncate(os.path.getsize(p) // 3)
                n += 1
    assert n


# --- 4. resume ---------------------------------------------------------------------------------


def test_corrupt_latest_checkpoint_falls_back_to_newest_intact(tmp_path, caplog):
    ref = _train(tmp_path / "ref", 6)
    d = tmp_path / "run"
    _train(d, 4)  # checkpoints 2 and 4
    ck = d / "checkpoints" / "toy"
    _corrupt(str(ck / "4"))
    with caplog.at_level("WARNING", logger="r1v2_jax.train"):
        final = _train(d, 6)
    assert "resuming from step 2, the newest intact checkpoint" in caplog.text
    assert "checkpoint 4 cannot be restored" in caplog.text
    np.testing.assert_array_equal(np.asarray(final.params["w"]), np.asarray(ref.params["w"]))
    assert _rows(d) == _rows(tmp_path / "ref")  # the log was cut back to step 2 and continued
    assert [n for n in os.listdir(ck) if n.startswith("corrupt-4-")]  # kept for inspection, out of the way
    assert sorted(int(n) for n in os.listdir(ck) if n.isdigit()) == [4, 6]


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
    d = tmp_path / "run"
    _train(d, 4)
    for s in ("2", "4"):
        _corrupt(str(d / "checkpoints" / "toy" / s))
    with pytest.raises(ResumeError, match=r"no checkpoint can be restored: step 4: .*; step 2: "):
        _train(d, 6)


def test_partial_last_metrics_line_does_not_block_resume(tmp_path):
    ref_dir = tmp_path / "ref"
    _train(ref_dir, 6)
    d = tmp_path / "run"
    _train(d, 4)
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"loss": 12.5, "stage": "toy", "st')  # a kill in the middle of a row
    with open(d / "timing.jsonl", "a") as f:
        f.write('{"seconds": 0.1')
    _train(d, 6)
    assert _rows(d) == _rows(ref_dir)
    assert len([json.loads(x) for x in open(d / "timing.jsonl")]) == 6


def test_a_bad_line_in_the_middle_of_the_log_names_file_and_line(tmp_path):
    d = tmp_path / "run"
    _train(d, 2)
    lines = open(d / "metrics.jsonl").readlines()
    open(d / "metrics.jsonl", "w").writelines(["garbage\n"] + lines)
    with pytest.raises(ValueError, match=r"metrics\.jsonl:1: not a JSON row"):
        _train(d, 4)


def test_log_truncation_is_an_atomic_rewrite(tmp_path, monkeypatch):
    log = MetricsLog(str(tmp_path), tensorboard=False)
    for i in range(1, 7):
        log.write({"stage": "toy", "step": i, "loss": float(i)})
    before = open(log.path).read()
    real_open = open

    class Dying:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def writelines(self, lines):
            lines = list(lines)
            self.f.writelines(lines[: len(lines) // 2])
            raise OSError("killed half way")

        def __getattr__(self, k):
            return getattr(self.f, k)

    def dying_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return Dying(f) if "w" in mode else f

    monkeypatch.setattr(metrics_log, "open", dying_open, raising=False)
    with pytest.raises(OSError, match="killed half way"):
        log.truncate(3, "toy")
    monkeypatch.undo()
    assert open(log.path).read() == before  # not cut: the rewrite goes to a temporary file first
    log.truncate(3, "toy")
    assert [r["step"] for r in log.rows()] == [1, 2, 3]


# --- 6. runaway updates ------------------------------------------------------------------------


def test_update_that_makes_parameters_non_finite_is_rolled_back():
    params = {"w": jnp.full((3,), 1e30, jnp.float32)}
    opt = optax.sgd(1e9)
    state = init_state(params, opt, seed=0)
    grads = {"w": jnp.full((3,), -1e30, jnp.float32)}  # finite loss and gradient, overflowing update
    new, ok = apply_gradients(state, grads, jnp.float32(1.0), opt)
    assert not bool(ok)
    np.testing.assert_array_equal(np.asarray(new.params["w"]), np.asarray(params["w"]))
    assert int(new.skipped) == 1 and int(new.step) == 1
    new, ok = apply_gradients(new, {"w": jnp.full((3,), 1e21, jnp.float32)}, jnp.float32(1.0), opt)
    assert bool(ok)  # a finite update still applies
    np.testing.assert_allclose(np.asarray(new.params["w"]), 0.0, atol=1e24)


def test_consecutive_skips_stop_with_a_clear_message(tmp_path):
    run = _run(tmp_path, every=100)

    def skipping(state, batch):
        state = state.replace(step=state.step + 1)
        ok = int(state.step) <= 2
        return state, {"loss": 1.0 if ok else float("nan"), "grad_norm": float("nan"), "step_ok": float(ok)}

    with pytest.raises(
        TrainingDiverged,
        match=r"toy: stopped at step 6: the last 4 steps were all skipped .*"
        r"not changed since step 2.*max_consecutive_skips=4",
    ):
        run_loop(run, "toy", _state(), 50, None, skipping, max_consecutive_skips=4)
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        OptimConfig(max_consecutive_skips=-1)


@pytest.mark.slow
def test_lr_1e30_run_stops_instead_of_exiting_0(tmp_path):
    """The issue's reproduction: SFT with lr=1e30 on the demo's tiny model."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [
        sys.executable,
        "-m",
        "r1v2_jax.cli",
        "demo",
        "--out",
        str(tmp_path / "run"),
        "--config.stages=('sft',)",
        "--config.sft.optim.lr=1e30",
        "--config.sft.steps=40",
        "--config.sft.optim.max_consecutive_skips=3",
        "--config.data.synthetic_n=16",
        "--config.data.batch_size=4",
        "--config.eval.prompts=1",
        "--config.eval.max_new_tokens=2",
        "--config.export=False",
        "--config.progress=False",
        "--config.checkpoint.every=100",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "sft: stopped at step" in r.stderr and "were all skipped" in r.stderr and "Traceback" not in r.stderr
    rows = [x for x in _rows(tmp_path / "run") if x["stage"] == "sft"]
    assert len(rows) < 40 and rows[-1]["step_ok"] == 0.0
    assert all(np.isfinite(x["loss"]) for x in rows if x["step_ok"])
