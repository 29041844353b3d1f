"""The released-key map: round trips, errors that name keys and shapes, format handling."""

import json

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from torch_ref import internvl_reference, write_released

import r1v2_jax
from r1v2_jax.convert import keymap
from r1v2_jax.convert.safetensors_io import CheckpointFormatError, SafetensorsDir
from r1v2_jax.convert.transformers_format import native_to_released, released_to_native
from r1v2_jax.model.config import model_config
from r1v2_jax.model.vlm import init_params


def _released(cfg, seed=0):
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(seed)))
    return params, dict(keymap.params_to_released(params, cfg))


def test_released_keys_are_the_reference_layout():
    cfg = model_config("tiny")
    keys = set(keymap.iter_keys(cfg))
    for k in [
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.position_embedding",
        "vision_model.encoder.layers.1.attn.qkv.weight",
        "vision_model.encoder.layers.0.attn.q_norm.weight",
        "vision_model.encoder.layers.0.ls2",
        "mlp1.0.bias",
        "mlp1.1.weight",
        "mlp1.3.weight",
        "language_model.model.embed_tokens.weight",
        "language_model.model.layers.1.self_attn.k_proj.bias",
        "language_model.model.layers.0.mlp.down_proj.weight",
        "language_model.model.norm.weight",
        "language_model.lm_head.weight",
    ]:
        assert k in keys
    assert "vision_model.encoder.layers.0.attn.qkv.bias" not in keys  # qkv_bias=False
    assert "vision_model.encoder.layers.0.norm1.bias" not in keys  # RMSNorm has no bias
    shapes = {e.key: e.shape for e in keymap.key_entries(cfg)}
    assert shapes["vision_model.encoder.layers.0.attn.qkv.weight"] == (96, 32)
    assert shapes["vision_model.embeddings.patch_embedding.weight"] == (32, 3, 14, 14)
    assert shapes["vision_model.embeddings.position_embedding"] == (1, 17, 32)
    assert shapes["language_model.lm_head.weight"] == (256, 48)


@pytest.mark.parametrize("scan", [True, False])
def test_round_trip_params_released_params(scan):
    cfg = model_config("tiny").replace(scan_layers=scan)
    params, rel = _released(cfg)
    back = keymap.released_to_params(rel.__getitem__, {k: v.shape for k, v in rel.items()}, cfg)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    again = dict(keymap.params_to_released(back, cfg))
    assert list(again) == list(rel)
    for k in rel:
        assert again[k].dtype == rel[k].dtype and np.array_equal(again[k], rel[k])


def test_stack_layout_conversion_round_trip():
    cfg = model_config("tiny")
    params, _ = _released(cfg)
    unrolled = keymap.stack_layout(params, cfg, scan=False)
    assert "block_1" in unrolled["language_model"]["layers"]
    np.testing.assert_array_equal(
        unrolled["vision_model"]["layers"]["block_1"]["ls1"], params["vision_model"]["layers"]["block"]["ls1"][1]
    )
    back = keymap.stack_layout(unrolled, cfg, scan=True)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_missing_extra_and_wrong_shape_are_named():
    cfg = model_config("tiny")
    _, rel = _released(cfg)
    shapes = {k: v.shape for k, v in rel.items()}
    s = dict(shapes)
    del s["mlp1.1.bias"]
    s["vision_model.encoder.layers.0.attn.qkv.bias"] = (96,)
    s["language_model.model.norm.weight"] = (47,)
    with pytest.raises(keymap.CheckpointKeyError) as e:
        keymap.check_keys(s, cfg, "ckpt-dir")
    msg = str(e.value)
    assert "ckpt-dir" in msg and "missing keys (1): mlp1.1.bias" in msg
    assert "unexpected keys (1): vision_model.encoder.layers.0.attn.qkv.bias" in msg
    assert "wrong shape for language_model.model.norm.weight: checkpoint has [47], model expects [48]" in msg


def test_load_pretrained_errors_name_key_and_shapes(tmp_path):
    cfg = model_config("tiny")
    ref = internvl_reference(cfg, seed=0)
    write_released(ref, cfg, str(tmp_path))
    path = tmp_path / "model.safetensors"
    d = SafetensorsDir(str(tmp_path))
    tensors = dict(d.items())
    tensors["mlp1.3.weight"] = np.zeros((48, 40), np.float32)
    del d
    save_file(tensors, str(path))
    with pytest.raises(
        r1v2_jax.CheckpointKeyError, match=r"mlp1\.3\.weight: checkpoint has \[48, 40\], model expects \[48, 48\]"
    ):
        r1v2_jax.load_pretrained(str(tmp_path))


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointFormatError, match="pickle checkpoints are never loaded"):
        SafetensorsDir(str(tmp_path))


def test_index_pointing_to_missing_shard(tmp_path):
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors"}}, f)
    with pytest.raises(CheckpointFormatError, match="model-00001-of-00002.safetensors"):
        SafetensorsDir(str(tmp_path))


def test_native_released_rename_round_trip():
    cfg = model_config("tiny")
    ref = internvl_reference(cfg, seed=1)
    sd = ref.state_dict()
    rel = dict(native_to_released(sd, lambda xs, axis: torch.cat(xs, dim=axis)))
    assert set(rel) == set(keymap.iter_keys(cfg))
    back = dict(released_to_native(rel))
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


@pytest.mark.parametrize("dtype,shard_bytes", [("float32", 10**9), ("bfloat16", 20_000)])
def test_save_released_round_trip_is_bit_identical(tmp_path, dtype, shard_bytes):
    cfg = model_config("tiny")
    ref = internvl_reference(cfg, seed=2)
    src = tmp_path / "src"
    write_released(ref, cfg, str(src), dtype=getattr(torch, dtype))
    m = r1v2_jax.load_pretrained(str(src), dtype=dtype)
    names = r1v2_jax.save_released(m, str(tmp_path / "out"), max_shard_bytes=shard_bytes)
    assert (len(names) > 1) == (shard_bytes < 10**9)
    a, b = SafetensorsDir(str(src)), SafetensorsDir(str(tmp_path / "out"))
    assert set(a.keys()) == set(b.keys())
    for k in a.keys():
        x, y = a.get(k), b.get(k)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), k
    if len(names) > 1:
        idx = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))
        assert set(idx["weight_map"]) == set(a.keys())
    m2 = r1v2_jax.load_pretrained(str(tmp_path / "out"), dtype=dtype)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), m.params, m2.params)


def test_save_released_refuses_non_empty_dir_and_leaves_no_partial(tmp_path):
    m = r1v2_jax.init_model("tiny")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        r1v2_jax.save_released(m, str(out))
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    r1v2_jax.save_released(m, str(out), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
