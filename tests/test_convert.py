"""Weight conversion: round trips, the transformers export, and failure handling."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch
from torch_ref import internvl_reference, write_released

import r1v2_jax
from r1v2_jax.convert.converters import hf_to_jax, jax_to_hf
from r1v2_jax.convert.keymap import CheckpointKeyError
from r1v2_jax.convert.param_store import CheckpointError, load_params
from r1v2_jax.convert.safetensors_io import CheckpointFormatError, SafetensorsDir
from r1v2_jax.model.config import model_config
from r1v2_jax.parallel.sharding import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _same_tensors(a_dir, b_dir):
    a, b = SafetensorsDir(a_dir), SafetensorsDir(b_dir)
    assert set(a.keys()) == set(b.keys())
    for k in a.keys():
        x, y = a.get(k), b.get(k)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), k


@pytest.fixture(scope="module")
def ref_model():
    cfg = model_config("tiny")
    return cfg, internvl_reference(cfg, seed=11)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("src_shards,out_shard_bytes", [(1, 5 * 1000**3), (3, 30_000)])
def test_round_trip_released_ours_released_bit_identical(tmp_path, ref_model, dtype, src_shards, out_shard_bytes):
    cfg, ref = ref_model
    src = str(tmp_path / "src")
    write_released(ref, cfg, src, dtype=getattr(torch, dtype), num_shards=src_shards)
    hf_to_jax(src, str(tmp_path / "ours"))
    names = jax_to_hf(str(tmp_path / "ours"), str(tmp_path / "back"), max_shard_bytes=out_shard_bytes)
    _same_tensors(src, str(tmp_path / "back"))
    if len(names) > 1:
        idx = json.load(open(tmp_path / "back" / "model.safetensors.index.json"))
        assert set(idx["weight_map"]) == set(SafetensorsDir(src).keys())
        assert sorted(set(idx["weight_map"].values())) == sorted(names)
    # The released config.json and tokenizer files travel through unchanged (dtype aside).
    src_cfg = json.load(open(os.path.join(src, "config.json")))
    back_cfg = json.load(open(tmp_path / "back" / "config.json"))
    assert back_cfg == src_cfg
    assert os.path.exists(tmp_path / "back" / "tokenizer_config.json")


def test_checkpoint_restores_like_load_pretrained(tmp_path, ref_model):
    cfg, ref = ref_model
    src = str(tmp_path / "src")
    write_released(ref, cfg, src)
    hf_to_jax(src, str(tmp_path / "ours"))
    a = r1v2_jax.load_pretrained(src)
    b = r1v2_jax.load_checkpoint(str(tmp_path / "ours"))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a.params, b.params)
    c = r1v2_jax.load_checkpoint(str(tmp_path / "ours"), scan_layers=False)
    assert "block_0" in c.params["language_model"]["layers"]


def test_sharded_restore_reads_onto_a_mesh(tmp_path, ref_model):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    cfg, ref = ref_model
    src = str(tmp_path / "src")
    write_released(ref, cfg, src)
    hf_to_jax(src, str(tmp_path / "ours"), mesh_shape=(2, 2, 2))
    meta = json.load(open(tmp_path / "ours" / "r1v2_params.json"))
    assert meta["leaves"]["language_model/layers/block/mlp/gate_proj/kernel"]["chunks"] == [1, 24, 48]
    mesh = make_mesh(2, 2, 2)
    m = r1v2_jax.load_checkpoint(str(tmp_path / "ours"), mesh=mesh)
    k = m.params["language_model"]["layers"]["block"]["mlp"]["gate_proj"]["kernel"]
    assert {s.data.shape for s in k.addressable_shards} == {(2, 24, 48)}
    full = r1v2_jax.load_pretrained(src)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), m.params, full.params)


def test_transformers_export_loads_with_from_pretrained(tmp_path, ref_model):
    from transformers import InternVLForConditionalGeneration

    cfg, ref = ref_model
    src = str(tmp_path / "src")
    write_released(ref, cfg, src)
    hf_to_jax(src, str(tmp_path / "ours"))
    jax_to_hf(str(tmp_path / "ours"), str(tmp_path / "tf"), fmt="transformers", max_shard_bytes=50_000)
    hf = InternVLForConditionalGeneration.from_pretrained(
        str(tmp_path / "tf"), local_files_only=True, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ours = r1v2_jax.load_checkpoint(str(tmp_path / "ours"))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.image_token_id - 1, (2, 16))
    ids[0, 1:5] = cfg.image_token_id
    ids[1, 6:10] = cfg.image_token_id
    pix = rng.standard_normal((2, 3, 56, 56)).astype(np.float32)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(ids, pix)), theirs, atol=1e-4, rtol=0)
    # and it is the very model we started from
    with torch.no_grad():
        orig = ref(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix)).logits.numpy()
    np.testing.assert_array_equal(theirs, orig)


# --- failures: clear messages, no loadable partial output -----------------------------------


def _assert_no_output(out):
    assert not os.path.exists(out) or not os.listdir(out)
    parent = os.path.dirname(out)
    assert not [n for n in os.listdir(parent) if n.startswith(f".{os.path.basename(out)}.partial-")]


def test_truncated_shard(tmp_path, ref_model):
    cfg, ref = ref_model
    src = str(tmp_path / "src")
    write_released(ref, cfg, src, num_shards=2)
    shard = os.path.join(src, "model-00002-of-00002.safetensors")
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match=r"model-00002-of-00002\.safetensors: not a readable safetensors"):
        hf_to_jax(src, str(tmp_path / "out"))
    _assert_no_output(str(tmp_path / "out"))


def test_missing_key_and_wrong_shape(tmp_path, ref_model):
    from safetensors.numpy import save_file

    cfg, ref = ref_model
    src = str(tmp_path / "src")
    write_released(ref, cfg, src)
    tensors = dict(SafetensorsDir(src).items())
    tensors.pop("language_model.model.layers.1.mlp.up_proj.weight")
    tensors["mlp1.1.bias"] = np.zeros(7, np.float32)
    save_file(tensors, os.path.join(src, "model.safetensors"))
    with pytest.raises(CheckpointKeyError) as e:
        hf_to_jax(src, str(tmp_path / "out"))
    assert "missing keys (1): language_model.model.layers.1.mlp.up_proj.weight" in str(e.value)
    assert "wrong shape for mlp1.1.bias: checkpoint has [7], model expects [48]" in str(e.value)
    _assert_no_output(str(tmp_path / "out"))


def test_mismatched_config_json(tmp_path, ref_model):
    cfg, ref = ref_model
    src = str(tmp_path / "src")
    write_released(ref, cfg, src)
    c = json.load(open(os.path.join(src, "config.json")))
    c["llm_config"]["intermediate_size"] = 128
    json.dump(c, open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(
        CheckpointKeyError, match=r"up_proj\.weight: checkpoint has \[96, 48\], model expects \[128, 48\]"
    ):
        hf_to_jax(src, str(tmp_path / "out"))
    _assert_no_output(str(tmp_path / "out"))


def test_existing_output_is_refused_then_overwritten(tmp_path, ref_model):
    cfg, ref = ref_model
    src = str(tmp_path / "src")
    write_released(ref, cfg, src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools/convert_weights/hf_to_jax.py"), src, str(out), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "exists and is not empty" in r.stderr and "--overwrite" in r.stderr
    assert (out / "notes.txt").read_text() == "mine"
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools/convert_weights/hf_to_jax.py"),
            src,
            str(out),
            "--quiet",
            "--overwrite",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert not (out / "notes.txt").exists() and (out / "r1v2_params.json").exists()


def test_killed_half_way_leaves_nothing_loadable(tmp_path):
    """SIGKILL during a conversion: OUT_DIR never appears, the partial folder is not loadable,
    and the next run cleans it up."""
    cfg = model_config("small")  # ~140M parameters: long enough to kill mid-way
    model = r1v2_jax.init_model(cfg)
    src = str(tmp_path / "src")
    r1v2_jax.save_released(model, src, max_shard_bytes=100 * 1000**2)
    del model
    out = str(tmp_path / "out")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tools/convert_weights/hf_to_jax.py"), src, out, "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    partial = None
    deadline = time.time() + 120
    while time.time() < deadline and partial is None:
        names = [n for n in os.listdir(tmp_path) if n.startswith(".out.partial-")]
        for n in names:
            if os.path.isdir(os.path.join(tmp_path, n, "params")):
                partial = os.path.join(tmp_path, n)
        time.sleep(0.005)
    assert partial is not None, "conversion never started writing"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out)
    assert os.path.isdir(partial)
    with pytest.raises(CheckpointError, match="not a complete r1v2 parameter checkpoint"):
        load_params(partial)
    # A new run removes the dead run's partial folder and completes.
    hf_to_jax(src, out)
    assert not os.path.exists(partial)
    load_params(out)
