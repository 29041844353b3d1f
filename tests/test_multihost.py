"""Multi-host correctness on one machine: two CPU processes joined by ``jax.distributed``
(gloo collectives, 2 devices each) train SFT -> GRPO with SSB on one 4-device mesh, and
must match one process with the same 4-device mesh. (Two devices a process suffice: every
array is split over both processes either way; with 4 each the test took 14 min of CI.)

The two-process run stops after 2 GRPO steps (its checkpoint written collectively by orbax
from arrays no single process holds), then a second launch resumes it to step 4: the
restored state, per-host data iterators, SSB and sampler all come back on non-fully-
addressable arrays. Metrics are written by process 0 only.
"""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from r1v2_jax.convert.safetensors_io import SafetensorsDir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = [
    "--config.stages=('sft','grpo')",
    "--config.grpo.reward_model.kind=none",
    "--config.sft.steps=20",
    "--config.grpo.steps={steps}",
    "--config.checkpoint.every=2",
    "--config.data.synthetic_n=40",
    "--config.eval.prompts=4",
    "--config.eval.max_new_tokens=8",
    "--config.grpo.group_size=4",
    "--config.grpo.max_new_tokens=8",
    "--config.data.batch_size=8",
    "--config.progress=False",
    "--config.grpo.optim.lr=1e-3",
    "--config.checkpoint.async_save=False",
]


pytestmark = pytest.mark.slow  # the fast lane (-m "not slow") skips this module


def _env(devices: int) -> dict:
    cache = os.environ.get("R1V2_TEST_JAX_CACHE", os.path.join(ROOT, ".jax_cache"))
    return dict(
        os.environ,
        PYTHONPATH=ROOT,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_COMPILATION_CACHE_DIR=cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        TOKENIZERS_PARALLELISM="false",
    )


def _cmd(run_dir: str, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "r1v2_jax.cli",
        "train",
        "--config",
        os.path.join(ROOT, "configs", "demo.py"),
        f"--config.run_dir={run_dir}",
        *[c.format(steps=steps) for c in COMMON],
        *extra,
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# XLA:CPU's gloo transport, which the CPU test cluster's collectives run on, now and then fails on
# a loaded 2-core machine ("op.preamble.length <= op.nbytes": a collective's bytes arriving
# where another's were expected; seen once in several runs, only while other processes competed
# for the cores; gloo bugs of this kind: jax-ml/jax#40830, #40831). TPU pods do not use gloo. Such
# a launch is relaunched once, as a preempted pod slice would be: it resumes from its last
# checkpoint, and the results below must still match one process exactly.
GLOO_TRANSPORT_ERROR = re.compile(r"gloo::EnforceNotMet|Gloo \w+ failed")


PER_PROCESS = 2  # devices of each of the two training processes; the mesh is (1, 2 * PER_PROCESS, 1)


def _launch(run_dir: str, steps: int) -> tuple[list[int], list[tuple[str, str]]]:
    """Both processes; when one fails the other is stopped (it would wait for its peer)."""
    port = _free_port()
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(2)]
    procs = [
        subprocess.Popen(
            _cmd(run_dir, steps, f"--coordinator=localhost:{port}", "--num-processes=2", f"--process-id={i}"),
            env=_env(PER_PROCESS),
            cwd=ROOT,
            stdout=files[i][0],
            stderr=files[i][1],
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 900
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                time.sleep(5)  # let the peer report its side, then stop it
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    outs = []
    for out, err in files:
        out.seek(0), err.seek(0)
        outs.append((out.read(), err.read()))
        out.close(), err.close()
    return [p.returncode for p in procs], outs


def _two_processes(run_dir: str, steps: int) -> list[tuple[str, str]]:
    for attempt in range(2):
        codes, outs = _launch(run_dir, steps)
        if codes == [0, 0]:
            return outs
        if attempt or not any(GLOO_TRANSPORT_ERROR.search(err) for _, err in outs):
            break
        print("two-process launch: gloo transport error, relaunching once (resumes from its checkpoint)")
    for i, (code, (out, err)) in enumerate(zip(codes, outs)):
        assert code == 0, f"process {i} failed:\n{out[-2000:]}\n{err[-4000:]}"
    return outs


def _rows(run_dir: str, stage: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["stage"] == stage]


def _params(run_dir: str) -> dict:
    d = SafetensorsDir(os.path.join(run_dir, "export", "released"))
    return {k: d.get(k) for k in d.keys()}


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r = subprocess.run(
        _cmd(one, 4, f"--config.mesh=(1,{2 * PER_PROCESS},1)"),
        env=_env(2 * PER_PROCESS),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-4000:]

    outs = _two_processes(two, 2)  # stops after GRPO step 2 (a final checkpoint at 2)
    assert "pass@1" in outs[0][0] and "pass@1" not in outs[1][0]  # the summary is printed by process 0
    assert [x["step"] for x in _rows(two, "grpo")] == [1, 2]
    assert sorted(os.listdir(os.path.join(two, "checkpoints", "grpo"))) == ["2"]
    data_state = json.load(open(os.path.join(two, "checkpoints", "grpo", "2", "data", "metadata")))
    assert len(data_state["hosts"]) == 2  # each host's own iterator state (8 local items read by each)
    assert all(h["grain"]["next_index"] == 8 for h in data_state["hosts"])
    _two_processes(two, 4)  # resumes from the step-2 checkpoint

    a, b = _rows(one, "grpo"), _rows(two, "grpo")
    assert [x["step"] for x in b] == [1, 2, 3, 4]  # process 0 alone writes the log: no duplicate rows
    with open(os.path.join(two, "timing.jsonl")) as f:
        assert sum(json.loads(x)["stage"] == "grpo" for x in f) == 4
    for key in ("reward_total", "response_length", "effective_share_before"):  # rollouts: the same samples
        assert [x[key] for x in a] == [x[key] for x in b], key
    assert any(x["grad_norm"] > 0 for x in a)  # the comparison below is not vacuous
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([x[key] for x in a], [x[key] for x in b], rtol=1e-4, atol=1e-6, err_msg=key)
    assert _rows(one, "sft")[-1]["step"] == 20
    np.testing.assert_allclose(_rows(one, "sft")[-1]["loss"], _rows(two, "sft")[-1]["loss"], rtol=1e-5)
    pa, pb = _params(one), _params(two)
    assert pa.keys() == pb.keys()
    worst = max(float(np.max(np.abs(pa[k].astype(np.float64) - pb[k]))) for k in pa)
    assert worst <= 1e-4, worst


@pytest.mark.slow
def test_engine_over_two_processes_matches_one_device(tmp_path):
    """The paged engine on a mesh over two processes (4 devices each; slots and page pools over
    data, KV heads over tensor): each host brings two of four prompts, every host runs the same
    host loop over all of them, and each host's rows are exactly those one device samples."""
    import jax
    from engine_worker import engine_case

    from r1v2_jax.model.config import model_config
    from r1v2_jax.model.vlm import R1V2Model, init_params
    from r1v2_jax.sampling.engine import EngineConfig, PagedEngine

    worker = os.path.join(ROOT, "tests", "engine_worker.py")
    for attempt in range(2):  # one relaunch on gloo's transport error (see GLOO_TRANSPORT_ERROR)
        port = _free_port()
        procs = [
            subprocess.Popen(
                [sys.executable, worker, f"localhost:{port}", str(i), str(tmp_path / f"{i}.npz")],
                env=_env(4),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        outs = [p.communicate(timeout=600) for p in procs]
        if all(p.returncode == 0 for p in procs) or not any(GLOO_TRANSPORT_ERROR.search(e) for _, e in outs):
            break
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    cfg = model_config("tiny")
    ids, pix, sp, ec = engine_case(cfg)
    one = PagedEngine(R1V2Model(cfg, init_params(cfg, jax.random.key(0))), EngineConfig(**ec))(
        ids, pixel_values=pix, sp=sp, num_samples=4, seed=3
    )
    for i in range(2):
        got = np.load(tmp_path / f"{i}.npz")
        rows = slice(8 * i, 8 * i + 8)  # host i's two prompts x 4 samples
        np.testing.assert_array_equal(got["tokens"], np.asarray(one.tokens)[rows])
        np.testing.assert_array_equal(got["lengths"], np.asarray(one.lengths)[rows])
        np.testing.assert_allclose(got["ref_logprobs"], np.asarray(one.ref_logprobs)[rows], atol=1e-5)
    assert 0 < int(np.asarray(one.finished).sum()) < 16  # ragged: some samples stop early
