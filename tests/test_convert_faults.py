"""Conversion under faults (issue 17, points 1 and 5): chunk files lost or changed after writing,
non-finite weights, hostile config.json numbers, kills at every moment of an --overwrite
publish, symlinked / unwritable / full output folders, bad safetensors offsets."""

import errno
import json
import os
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest

import r1v2_jax
from r1v2_jax.convert import publish, safetensors_io
from r1v2_jax.convert.cli import main_hf_to_jax, main_jax_to_hf
from r1v2_jax.convert.converters import hf_to_jax, jax_to_hf
from r1v2_jax.convert.hf_config import read_config
from r1v2_jax.convert.param_store import CheckpointError, load_params, read_metadata
from r1v2_jax.convert.publish import OutputError
from r1v2_jax.convert.safetensors_io import CheckpointFormatError, SafetensorsDir
from r1v2_jax.model.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEAF = "language_model/layers/block/mlp/up_proj/kernel"  # a stacked leaf: one chunk file per layer


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny random model in the released format (no torch needed)."""
    d = str(tmp_path_factory.mktemp("rel") / "released")
    r1v2_jax.save_released(r1v2_jax.init_model("tiny", seed=3), d)
    return d


def _chunk_files(ckpt, leaf=LEAF):
    base = os.path.join(ckpt, "params", leaf)
    return sorted(
        os.path.relpath(os.path.join(r, f), base) for r, _, fs in os.walk(base) for f in fs if f != "zarr.json"
    )


# --- 1. silent weight corruption ------------------------------------------------------------


def test_missing_chunk_file_is_refused_naming_the_array(tmp_path, released):
    ours = str(tmp_path / "ours")
    hf_to_jax(released, ours)
    chunks = _chunk_files(ours)
    assert len(chunks) == 2  # two layers, one chunk each
    os.remove(os.path.join(ours, "params", LEAF, chunks[1]))  # as an interrupted copy leaves it
    with pytest.raises(CheckpointError, match=rf"parameter array {LEAF}: file\(s\) .*{chunks[1]}.* missing"):
        load_params(ours)
    with pytest.raises(CheckpointError, match=LEAF):
        r1v2_jax.load_checkpoint(ours)
    r = main_jax_to_hf([ours, str(tmp_path / "back"), "--quiet"])
    assert r == 2 and not os.path.exists(tmp_path / "back")


def test_changed_chunk_bytes_fail_the_checksum(tmp_path, released):
    ours = str(tmp_path / "ours")
    hf_to_jax(released, ours)
    path = os.path.join(ours, "params", LEAF, _chunk_files(ours)[0])
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{LEAF}: file .* fails its checksum"):
        load_params(ours)
    load_params(ours, verify="size")  # the cheaper check does not read the data
    open(path, "ab").write(b"\0")
    with pytest.raises(CheckpointError, match=rf"{LEAF}: file .* has {len(data) + 1} bytes"):
        load_params(ours, verify="size")


def test_manifest_lists_every_file_and_round_trip_still_exact(tmp_path, released):
    ours = str(tmp_path / "ours")
    hf_to_jax(released, ours)
    meta = read_metadata(ours)
    assert meta["version"] == 2 and set(meta["manifest"]) == set(meta["leaves"])
    assert set(meta["manifest"][LEAF]) == {"zarr.json", *_chunk_files(ours)}
    jax_to_hf(ours, str(tmp_path / "back"))
    a, b = SafetensorsDir(released), SafetensorsDir(str(tmp_path / "back"))
    assert all(a.get(k).tobytes() == b.get(k).tobytes() for k in a.keys())


def test_non_finite_weights_are_counted_reported_and_refused_when_strict(tmp_path, released, capsys):
    from safetensors.numpy import save_file

    src = tmp_path / "nan"
    src.mkdir()
    for f in os.listdir(released):
        if not f.endswith(".safetensors"):
            (src / f).write_bytes(open(os.path.join(released, f), "rb").read())
    tensors = dict(SafetensorsDir(released).items())
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    w = tensors[key].copy()
    w[0, :3] = [np.nan, np.inf, -np.inf]
    tensors[key] = w
    save_file(tensors, str(src / "model.safetensors"))

    report = {}
    hf_to_jax(str(src), str(tmp_path / "ours"), report=report)
    assert report["nonfinite"] == {LEAF: 3}
    assert read_metadata(str(tmp_path / "ours"))["nonfinite"][LEAF] == 3
    report = {}
    jax_to_hf(str(tmp_path / "ours"), str(tmp_path / "back"), report=report)
    assert report["nonfinite"] == {key: 3}

    r = main_hf_to_jax([str(src), str(tmp_path / "strict"), "--quiet", "--strict-finite"])
    err = capsys.readouterr().err
    assert r == 2 and "3 non-finite value(s) in 1 tensor(s)" in err and LEAF in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "strict")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".strict.")]
    r = main_jax_to_hf([str(tmp_path / "ours"), str(tmp_path / "strict2"), "--quiet", "--strict-finite"])
    assert r == 2 and key in capsys.readouterr().err and not os.path.exists(tmp_path / "strict2")
    r = main_hf_to_jax([str(src), str(tmp_path / "lax"), "--quiet"])
    assert r == 0 and "WARNING: 3 non-finite values in 1 tensors" in capsys.readouterr().out


@pytest.mark.parametrize(
    "section,key,value,msg",
    [
        ("llm_config", "rms_norm_eps", float("nan"), "finite"),
        ("llm_config", "rms_norm_eps", float("inf"), "finite"),
        ("llm_config", "rms_norm_eps", -1e-6, "in \\(0, 1\\)"),
        ("vision_config", "layer_norm_eps", 0.0, "in \\(0, 1\\)"),
        ("vision_config", "layer_norm_eps", "1e-6", "expected a number"),
        ("llm_config", "rope_theta", float("inf"), "finite"),
        ("llm_config", "hidden_size", 10**9, "integer in \\[1, 131072\\]"),
        ("llm_config", "num_key_value_heads", 2.5, "expected int"),
        ("llm_config", "head_dim", 0, "integer in \\[1, 4096\\]"),
        ("llm_config", "max_position_embeddings", 1 << 40, "integer in"),
        ("vision_config", "num_hidden_layers", 100000, "integer in \\[1, 1024\\]"),
        ("vision_config", "image_size", -448, "integer in"),
        (None, "downsample_ratio", float("nan"), "finite positive"),
    ],
)
def test_config_json_numbers_are_validated(tmp_path, released, section, key, value, msg):
    d = json.load(open(os.path.join(released, "config.json")))
    (d if section is None else d[section])[key] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))  # NaN / Infinity as Python's json writes (and reads) them
    (tmp_path / "tokenizer_config.json").write_bytes(open(os.path.join(released, "tokenizer_config.json"), "rb").read())
    field = key if section is None else f"{section}.{key}"
    with pytest.raises(ConfigError, match=rf"config\.json: {field}: .*{msg}"):
        read_config(str(tmp_path))


# --- 5. publishing ----------------------------------------------------------------------------

_KILL_SCRIPT = r"""
import os, signal, sys
from r1v2_jax.convert import publish as sio
from r1v2_jax.convert.converters import hf_to_jax
src, out, mode = sys.argv[1:4]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_ex, real_rename, real_rmtree = sio.exchange_paths, os.rename, sio.shutil.rmtree
def ex(a, b):
    if mode == "before-exchange": die()
    if mode.startswith("fallback"): return False
    r = real_ex(a, b)
    if mode == "after-exchange": die()
    return r
def rename(a, b):
    real_rename(a, b)
    if (mode == "fallback-first" and a == out) or (mode == "fallback-second" and b == out): die()
def rmtree(p, *a, **k):
    if mode == "during-delete":  # half of the old copy deleted
        for r, _, fs in os.walk(p):
            for f in fs[: len(fs) // 2 + 1]:
                os.remove(os.path.join(r, f))
        die()
    real_rmtree(p, *a, **k)
sio.exchange_paths, os.rename, sio.shutil.rmtree = ex, rename, rmtree
hf_to_jax(src, out, overwrite=True, dtype="bfloat16")
"""


@pytest.mark.parametrize(
    "mode", ["before-exchange", "after-exchange", "during-delete", "fallback-first", "fallback-second"]
)
def test_overwrite_killed_at_any_moment_leaves_old_or_new(tmp_path, released, mode):
    out = str(tmp_path / "out")
    hf_to_jax(released, out)  # the old copy: float32
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, released, out, mode], env=env, capture_output=True, text=True
    )
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    want = "bfloat16" if mode in ("after-exchange", "during-delete", "fallback-second") else "float32"
    if mode == "fallback-first":  # the fallback's one window: out is absent until the next run restores it
        assert not os.path.exists(out)
    else:  # whatever is at out is complete as it is, before any recovery
        assert read_metadata(out)["leaves"][LEAF]["dtype"] == want
        load_params(out)
    # The next run recovers: the old copy is never deleted as stale; leftovers go.
    publish.recover_output_dir(out)
    assert read_metadata(out)["leaves"][LEAF]["dtype"] == want
    load_params(out)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".out.")] == []


def test_fallback_kill_between_renames_then_next_run_restores_old(tmp_path, released):
    out = str(tmp_path / "out")
    hf_to_jax(released, out)
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-c", _KILL_SCRIPT, released, out, "fallback-first"], env=env)
    assert not os.path.exists(out)
    with pytest.raises(FileExistsError, match="not empty"):  # the next run puts the old copy back first
        hf_to_jax(released, out)
    assert read_metadata(out)["leaves"][LEAF]["dtype"] == "float32"
    load_params(out)


def test_symlinked_output_is_refused_before_any_work(tmp_path, released):
    target = tmp_path / "real"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(target)
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="is a symbolic link"):
            hf_to_jax(str(tmp_path / "no-such-source"), str(link), overwrite=overwrite)  # refused first
        with pytest.raises(OutputError, match="is a symbolic link"):
            jax_to_hf(str(tmp_path / "no-such-ckpt"), str(link), overwrite=overwrite)
        with pytest.raises(OutputError, match="is a symbolic link"):
            r1v2_jax.save_released(r1v2_jax.init_model("tiny"), str(link), overwrite=overwrite)
    assert os.path.islink(link) and (target / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


def test_published_folders_get_umask_permissions(tmp_path, released):
    old = os.umask(0o022)
    try:
        hf_to_jax(released, str(tmp_path / "ours"))
        jax_to_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
        r1v2_jax.save_released(r1v2_jax.init_model("tiny"), str(tmp_path / "saved"))
    finally:
        os.umask(old)
    for d in ("ours", "back", "saved"):
        assert os.stat(tmp_path / d).st_mode & 0o777 == 0o755, d
    assert os.stat(tmp_path / "back" / "model.safetensors").st_mode & 0o777 == 0o644


def test_disk_full_and_read_only_targets_give_clean_errors(tmp_path, released, monkeypatch, capsys):
    ours = str(tmp_path / "ours")
    hf_to_jax(released, ours)
    back = tmp_path / "back"
    jax_to_hf(ours, str(back))
    before = sorted(os.listdir(back))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors_io, "_write_shard", full)
    assert main_jax_to_hf([ours, str(back), "--quiet", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "nothing was published" in err and "Traceback" not in err
    assert sorted(os.listdir(back)) == before  # the old copy is untouched
    monkeypatch.undo()

    from r1v2_jax.convert import param_store

    monkeypatch.setattr(param_store.ParamWriter, "write", full)
    assert main_hf_to_jax([released, ours, "--quiet", "--overwrite"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    load_params(ours)  # still the old, complete checkpoint
    monkeypatch.undo()

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(publish.tempfile, "mkdtemp", read_only)
    assert main_hf_to_jax([released, str(tmp_path / "ro"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and "cannot write the output folder" in err and "Traceback" not in err
    monkeypatch.undo()
    assert main_jax_to_hf([ours, "/sys/r1v2-cannot-create-here", "--quiet"]) == 2  # a real refusal (EPERM)
    assert "cannot write the output folder" in capsys.readouterr().err
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def _raw_safetensors(path, entries, data_len):
    header = json.dumps({k: {"dtype": "F32", "shape": s, "data_offsets": o} for k, (s, o) in entries.items()})
    header = header.encode() + b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + b"\0" * data_len)


@pytest.mark.parametrize(
    "entries,msg",
    [
        ({"a": ([2], [-8, 0])}, "tensor 'a' has invalid data_offsets \\[-8, 0\\]"),
        ({"a": ([2], [0, 8]), "b": ([2], [4, 12])}, "tensors 'a' \\[0, 8\\] and 'b' \\[4, 12\\] have overlapping"),
        ({"a": ([2], [0, 8]), "b": ([2], [0, 8])}, "overlapping data_offsets"),
        ({"a": ([2], [0.0, 8])}, "data_offsets must be two integers"),
    ],
)
def test_bad_data_offsets_name_the_file(tmp_path, entries, msg):
    _raw_safetensors(tmp_path / "model.safetensors", entries, 16)
    with pytest.raises(CheckpointFormatError, match=rf"model\.safetensors: .*{msg}"):
        SafetensorsDir(str(tmp_path))
