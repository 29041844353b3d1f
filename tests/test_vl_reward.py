"""Skywork-VL-Reward (Qwen2.5-VL + value head) against transformers, in float32.

Tiny random ``Qwen2_5_VLForConditionalGeneration`` checkpoints are written with
``save_pretrained`` (which writes the transformers-4 key names of the release, ``model.*`` /
``visual.*``), for one seed renamed to the in-memory naming (``model.language_model.*`` /
``model.visual.*``), plus a ``value_head.safetensors`` (TRL keys) of a torch linear head. Tolerances
(fixed): single blocks <= 1e-5, whole models <= 1e-4 max abs difference.
"""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np
from safetensors.torch import save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionBlock
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.vision_utils import get_vision_window_index

from r1v2_jax.convert.keymap import CheckpointKeyError
from r1v2_jax.convert.safetensors_io import SafetensorsDir
from r1v2_jax.convert.skywork_vl import VALUE_HEAD_FILE, detect_naming, export_skywork_vl, load_skywork_vl
from r1v2_jax.data.qwen_vl_image import IMAGE_PAD, chat_prompt, preprocess_images, smart_resize
from r1v2_jax.model.qwen2_5_vl import (
    VisionBlock,
    frame_segments,
    rope_index,
    skywork_vl_reward_7b,
    vision_positions,
    vision_rope_tables,
    window_index,
)
from r1v2_jax.parallel.sharding import make_mesh
from r1v2_jax.rewards.vl_reward import (
    VLRewardModel,
    abstract_vl_reward_params,
    make_vl_scorer,
    score_texts,
    vl_reward_shardings,
)

BLOCK_TOL = 1e-5
E2E_TOL = 1e-4
IMG, VSTART, VEND = 290, 292, 293
MAX_PIXELS = 28 * 28 * 48  # small images: grids of a few merged patches a side


def hf_config(seed: int) -> Qwen2_5_VLConfig:
    """Tiny Qwen2.5-VL: windows of 2×2 merged patches (56 px), full attention at blocks 1, 3."""
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=300,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            rms_norm_eps=1e-6,
            rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 2, 2]),
            bos_token_id=None,
            eos_token_id=None,
        ),
        vision_config=dict(
            depth=4,
            hidden_size=32,
            num_heads=2,
            intermediate_size=48,
            out_hidden_size=48,
            window_size=56,
            fullatt_block_indexes=[1, 3] if seed != 1 else [0],
        ),
        image_token_id=IMG,
        video_token_id=291,
        vision_start_token_id=VSTART,
        vision_end_token_id=VEND,
    )
    for c in (cfg, cfg.vision_config, cfg.text_config):
        c._attn_implementation = "eager"
    return cfg


def reference(seed: int):
    """(HF model, torch value head), every weight random (norm scales around 1)."""
    torch.manual_seed(seed)
    m = Qwen2_5_VLForConditionalGeneration(hf_config(seed)).eval()
    head = torch.nn.Linear(48, 1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in list(m.named_parameters()) + [("v_head." + k, v) for k, v in head.named_parameters()]:
            r = torch.randn(p.shape, generator=g)
            if n.endswith("norm.weight") or ".norm1." in n or ".norm2." in n or "ln_q" in n or "layernorm" in n:
                p.copy_(1 + 0.2 * r)
            elif n.endswith("bias"):
                p.copy_(0.1 * r)
            else:
                p.copy_(r / np.sqrt(np.prod(p.shape[1:]) if p.ndim > 1 else 1))
    return m, head


def to_v5_naming(d: str) -> None:
    """Rename a save_pretrained directory's keys (transformers 5 writes the transformers-4
    names of the release) to the in-memory naming of transformers >= 4.52."""

    def rename(k):
        if k.startswith("visual."):
            return "model." + k
        return k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k

    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    for f in files:
        t = load_np(os.path.join(d, f))
        save_np({rename(k): v for k, v in t.items()}, os.path.join(d, f), metadata={"format": "pt"})
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as fh:
            j = json.load(fh)
        j["weight_map"] = {rename(k): v for k, v in j["weight_map"].items()}
        with open(idx, "w") as fh:
            json.dump(j, fh)


def write_release(m, head, d: str, *, naming: str, shard: str | None = None, lm_head: bool = True, dtype=None):
    if dtype is not None:
        m = m.to(dtype)
        head = head.to(dtype)
    m.save_pretrained(d, max_shard_size=shard or "50GB")
    if not lm_head:  # a reward model released without the LM head
        for f in sorted(x for x in os.listdir(d) if x.endswith(".safetensors")):
            t = load_np(os.path.join(d, f))
            if t.pop("lm_head.weight", None) is not None:
                save_np(t, os.path.join(d, f), metadata={"format": "pt"})
        idx = os.path.join(d, "model.safetensors.index.json")
        if os.path.exists(idx):
            with open(idx) as fh:
                j = json.load(fh)
            j["weight_map"].pop("lm_head.weight")
            with open(idx, "w") as fh:
                json.dump(j, fh)
    if naming == "v5":
        to_v5_naming(d)
    save_file(
        {"v_head.summary.weight": head.weight.detach().contiguous(), "v_head.summary.bias": head.bias.detach()},
        os.path.join(d, VALUE_HEAD_FILE),
    )
    return d


CASES = {  # seed: (naming, shard size, lm_head, scan_layers)
    0: ("v4", None, True, True),
    1: ("v5", "100KB", True, False),
    2: ("v4", "100KB", False, True),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def released(request, tmp_path_factory):
    seed = request.param
    naming, shard, lm_head, scan = CASES[seed]
    m, head = reference(seed)
    d = write_release(m, head, str(tmp_path_factory.mktemp(f"vlrm{seed}")), naming=naming, shard=shard, lm_head=lm_head)
    config, params = load_skywork_vl(d, scan_layers=scan, attention_impl="xla")
    return seed, m, head, d, config, params


def _images(seed: int):
    """Images of several sizes and aspect ratios (grids with partial windows)."""
    rng = np.random.default_rng(seed)
    sizes = [(70, 150), (150, 60), (90, 90)][: 2 + seed % 2]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _batch(seed: int, grids):
    """Two rows (the second left-padded, the first right-padded): text, images in
    <|vision_start|> pads <|vision_end|>, text; row 0 holds the first image, row 1 the rest."""
    rng = np.random.default_rng(100 + seed)
    rows = []
    for owned in (grids[:1], grids[1:]):
        r = list(rng.integers(0, 280, 3 + seed))
        for t, h, w in owned:
            r += [VSTART] + [IMG] * (t * h * w // 4) + [VEND] + list(rng.integers(0, 280, 2))
        rows.append(r + list(rng.integers(0, 280, 4)))
    t = max(len(r) for r in rows) + 2
    ids = np.zeros((2, t), np.int64)
    mask = np.zeros((2, t), np.int64)
    ids[0, : len(rows[0])], mask[0, : len(rows[0])] = rows[0], 1
    ids[1, t - len(rows[1]) :], mask[1, t - len(rows[1]) :] = rows[1], 1
    return ids, mask


def test_naming_detected(released):
    seed, _, _, d, config, params = released
    assert detect_naming(SafetensorsDir(d).keys()) == CASES[seed][0]
    assert config.lm_head == CASES[seed][2]
    assert ("lm_head" in params["backbone"]["language_model"]) == CASES[seed][2]
    # the loaded tree is the module's own (what shardings and init are derived from)
    abstract = abstract_vl_reward_params(config, boxed=False)
    assert jax.tree.map(lambda a: tuple(a.shape), abstract) == jax.tree.map(lambda a: tuple(a.shape), params)


def test_end_to_end_parity(released):
    """Logits, final hidden states and value-head scores of a padded batch with images."""
    seed, m, head, _, config, params = released
    pix, grids = preprocess_images(_images(seed), max_pixels=MAX_PIXELS)
    ids, mask = _batch(seed, grids)
    tt = {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "pixel_values": torch.tensor(pix),
        "image_grid_thw": torch.tensor(grids),
        "mm_token_type_ids": torch.tensor((ids == IMG).astype(np.int64)),
    }
    with torch.no_grad():
        hid = m.model(**tt).last_hidden_state
        last = torch.tensor([int(np.nonzero(r)[0].max()) for r in mask])
        theirs_score = head(hid[torch.arange(2), last])[:, 0].numpy()
        theirs_logits = m(**tt).logits.numpy() if config.lm_head else None
    pos = rope_index(ids, mask, grids, IMG, 2)
    real = mask.astype(bool)
    model = VLRewardModel(config)
    args = (jnp.asarray(ids), jnp.asarray(pix), grids, jnp.asarray(pos), jnp.asarray(mask))
    ours_hid = model.apply({"params": params}, *args, method=lambda s, *a: s.backbone.hidden(*a))
    assert np.abs(np.asarray(ours_hid) - hid.numpy())[real].max() <= E2E_TOL
    if config.lm_head:
        ours_logits = model.apply({"params": params}, *args, method=lambda s, *a: s.backbone(*a))
        assert np.abs(np.asarray(ours_logits) - theirs_logits)[real].max() <= E2E_TOL
    score = make_vl_scorer(config)(params, ids, pix, np.asarray(grids), mask)
    assert score.shape == (2,)
    np.testing.assert_allclose(np.asarray(score), theirs_score, rtol=0, atol=E2E_TOL)
    assert np.abs(theirs_score).min() > 1e-3  # the head is not trivially zero


@pytest.mark.slow  # three more compiles on an 8-device host mesh
def test_sharded_scores_equal_single_device(released):
    """On a data x fsdp x tensor = 2 x 2 x 2 mesh of host devices the scores are those of one device."""
    seed, *_, config, params = released
    pix, grids = preprocess_images(_images(seed), max_pixels=MAX_PIXELS)
    ids, mask = _batch(seed, grids)
    ids, mask = np.concatenate([ids, ids[::-1]]), np.concatenate([mask, mask[::-1]])
    grids2 = grids[:1] + grids[1:] + grids[1:] + grids[:1]
    n0 = grids[0][1] * grids[0][2]
    pix2 = np.concatenate([pix, pix[n0:], pix[:n0]])
    mesh = make_mesh(2, 2, 2, devices=jax.devices()[:8])
    placed = jax.device_put(params, vl_reward_shardings(config, mesh))
    sharded = make_vl_scorer(config, mesh)(placed, ids, pix2, np.asarray(grids2), mask)
    single = make_vl_scorer(config)(params, ids, pix2, np.asarray(grids2), mask)
    assert np.abs(np.asarray(sharded) - np.asarray(single)).max() <= BLOCK_TOL


@pytest.mark.parametrize("grids", [((1, 6, 10), (1, 8, 4), (1, 2, 2)), ((1, 6, 10),) * 3])
def test_vision_encoder_parity(released, grids):
    """Merged image features (window permutation and its inverse included) for grids with
    partial windows, several images in one call: of different grids (one sequence with
    segment ids) and of one grid (a batch of images)."""
    seed, m, _, _, config, params = released
    pix = np.random.default_rng(seed).standard_normal((sum(t * h * w for t, h, w in grids), 1176)).astype(np.float32)
    with torch.no_grad():
        theirs = torch.cat(m.model.get_image_features(torch.tensor(pix), torch.tensor(grids)).pooler_output).numpy()
    ours = VLRewardModel(config).apply(
        {"params": params}, jnp.asarray(pix), grids, method=lambda s, p, g: s.backbone.visual(p, g)
    )
    assert ours.shape == theirs.shape
    assert np.abs(np.asarray(ours) - theirs).max() <= E2E_TOL


def test_vision_block_parity(released):
    """One window-attention block (segment ids from the window index) and one full block."""
    seed, m, _, _, config, params = released
    grids = ((1, 6, 10), (1, 4, 4))
    n = sum(t * h * w for t, h, w in grids)
    x = np.random.default_rng(seed).standard_normal((n, 32)).astype(np.float32)
    index, seg_win = window_index(grids, 2, 56, 14)
    perm = (index[:, None] * 4 + np.arange(4)).reshape(-1)
    cos, sin = vision_rope_tables(jnp.asarray(vision_positions(grids, 2)[perm]), 16, 10000.0)
    _, cu_win = get_vision_window_index(torch.tensor(grids), 2, 56, 14)
    cu_full = torch.tensor([0, 60, 76], dtype=torch.int32)
    vis = params["backbone"]["visual"]["layers"]
    for layer, full in ((0, config.vision.fullatt_block_indexes[0] == 0), (1, False), (3, True)):
        p = jax.tree.map(lambda a: a[layer], vis["block"]) if config.scan_layers else vis[f"block_{layer}"]
        ours, _ = VisionBlock(config.vision, jnp.float32, jnp.float32).apply(
            {"params": p},
            jnp.asarray(x)[None],
            jnp.asarray(full),
            cos[None],
            sin[None],
            jnp.asarray(frame_segments(grids)[perm])[None],
            jnp.asarray(seg_win)[None],
        )
        blk: Qwen2_5_VLVisionBlock = m.model.visual.blocks[layer]
        with torch.no_grad():
            theirs = blk(
                torch.tensor(x),
                cu_seqlens=cu_full if full else cu_win,
                position_embeddings=(torch.tensor(np.asarray(cos)), torch.tensor(np.asarray(sin))),
            ).numpy()
        assert np.abs(np.asarray(ours[0]) - theirs).max() <= BLOCK_TOL


@pytest.mark.parametrize("grids", [((1, 6, 10),), ((1, 8, 4), (1, 2, 2)), ((1, 16, 12), (1, 4, 18)), ((2, 4, 6),)])
def test_window_index_matches_transformers(grids):
    index, seg = window_index(grids, 2, 112, 14)
    theirs_index, cu = get_vision_window_index(torch.tensor(grids), 2, 112, 14)
    np.testing.assert_array_equal(index, theirs_index.numpy())
    np.testing.assert_array_equal(np.diff(cu.numpy()), np.bincount(seg)[1:])


def test_rope_index_matches_transformers(released):
    seed, m, *_ = released
    grids = ((1, 6, 10), (1, 4, 4), (1, 2, 8))
    ids, mask = _batch(seed, grids)
    theirs, _ = m.model.get_rope_index(
        torch.tensor(ids),
        torch.tensor((ids == IMG).astype(np.int64)),
        torch.tensor(grids),
        attention_mask=torch.tensor(mask),
    )
    np.testing.assert_array_equal(rope_index(ids, mask, grids, IMG, 2), theirs.numpy())
    with pytest.raises(ValueError, match="image-pad run"):
        rope_index(ids, mask, ((1, 6, 10), (1, 4, 4), (1, 4, 8)), IMG, 2)


def test_preprocessing_matches_transformers():
    """Grids and pixel values equal to transformers' Qwen2-VL image processor (PIL backend,
    bitwise), over sizes that resize up, down and not at all, and extreme aspect ratios."""
    rng = np.random.default_rng(0)
    sizes = [(37, 91), (200, 120), (56, 56), (300, 17), (640, 480), (28, 1000)]
    ims = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    out = proc(images=ims, return_tensors="np")
    pix, grids = preprocess_images(ims, max_pixels=28 * 28 * 64)
    assert [list(g) for g in grids] == out["image_grid_thw"].tolist()
    assert pix.dtype == np.float32 and np.array_equal(pix, out["pixel_values"])
    for h, w in sizes:
        gh, gw = smart_resize(h, w, max_pixels=28 * 28 * 64)
        assert gh % 28 == 0 and gw % 28 == 0 and 56 * 56 <= gh * gw <= 28 * 28 * 64


def test_chat_prompt_image_pads():
    text = chat_prompt("What is shown?", "A cat.", [(1, 6, 10), (1, 4, 4)])
    assert text.count(IMAGE_PAD) == 15 + 4
    assert text.index("<|vision_start|>") < text.index("What is shown?")
    assert text.endswith("A cat.<|im_end|>\n")


def test_score_texts_equals_scorer(released):
    """score_texts (template, preprocessing, padding) gives the scorer's scores row by row."""
    seed, *_, config, params = released
    special = {"<|vision_start|>": VSTART, IMAGE_PAD: IMG, "<|vision_end|>": VEND}

    def tok(text):  # a toy tokenizer: the vision tokens, then bytes (ids below the specials)
        parts = re.split("(" + "|".join(re.escape(k) for k in special) + ")", text)
        return [i for p in parts for i in ([special[p]] if p in special else [b % 250 for b in p.encode()])]

    ims = _images(seed)
    items = [("q one", "answer", ims[:1]), ("question two", "a longer answer here", ims[1:])]
    score = make_vl_scorer(config)
    batched = score_texts(score, params, tok, items, max_pixels=MAX_PIXELS)
    for i, (q, r, im) in enumerate(items):
        pix, g = preprocess_images(im, max_pixels=MAX_PIXELS)
        ids = np.asarray([tok(chat_prompt(q, r, g))])
        alone = np.asarray(score(params, ids, pix, np.asarray(g), np.ones_like(ids)))
        np.testing.assert_allclose(batched[i], alone[0], rtol=0, atol=E2E_TOL)


def _read_all(d):
    src = SafetensorsDir(d)
    out = {k: (src.dtype(k), src.get(k)) for k in src.keys()}
    vh = load_np(os.path.join(d, VALUE_HEAD_FILE))
    return out, vh


@pytest.mark.parametrize("naming, dtype", [("v4", None), ("v4", torch.bfloat16), ("v5", torch.bfloat16)])
def test_export_round_trip_is_bitwise(tmp_path, naming, dtype):
    """load -> export gives the released tensors back bit for bit, key for key (same naming)."""
    m, head = reference(3)
    src = write_release(m, head, str(tmp_path / "src"), naming=naming, shard="100KB", dtype=dtype)
    config, params = load_skywork_vl(src)
    export_skywork_vl(params, config, str(tmp_path / "out"), naming=naming, max_shard_bytes=100_000)
    (a, vha), (b, vhb) = _read_all(src), _read_all(str(tmp_path / "out"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k][0] == b[k][0], k
        assert a[k][1].tobytes() == b[k][1].tobytes(), k
    assert sorted(vha) == sorted(vhb)
    for k in vha:
        assert vha[k].dtype == vhb[k].dtype and vha[k].tobytes() == vhb[k].tobytes(), k
    config2, params2 = load_skywork_vl(str(tmp_path / "out"))
    assert config2 == config
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        assert x.tobytes() == y.tobytes()


def test_load_errors_name_file_and_key(tmp_path):
    m, head = reference(4)
    d = write_release(m, head, str(tmp_path / "ok"), naming="v4")
    main = os.path.join(d, "model.safetensors")
    vh = os.path.join(d, VALUE_HEAD_FILE)
    t = load_np(main)
    t.pop("visual.blocks.2.attn.qkv.bias")
    t["visual.blocks.0.mlp.up_proj.weight"] = t["visual.blocks.0.mlp.up_proj.weight"][:, :-1]
    t["model.extra.weight"] = np.zeros(3, np.float32)
    save_np(t, main)
    save_np({"v_head.summary.weight": np.zeros((1, 48), np.int32), "v_head.summary.bias": np.zeros(2, np.float32)}, vh)
    with pytest.raises(CheckpointKeyError) as e:
        load_skywork_vl(d)
    msg = str(e.value)
    assert "missing keys (1): visual.blocks.2.attn.qkv.bias" in msg
    assert "unexpected keys (1): model.extra.weight" in msg
    assert f"{main}: visual.blocks.0.mlp.up_proj.weight: shape [48, 31]" in msg
    assert f"{vh}: v_head.summary.weight: dtype I32" in msg
    assert f"{vh}: v_head.summary.bias: shape [2], the config expects [1]" in msg
    os.remove(vh)
    with pytest.raises(CheckpointKeyError, match="no value_head.safetensors"):
        load_skywork_vl(d)


def test_7b_preset_shapes():
    """The real Skywork-VL-Reward-7B shapes: parameter count of Qwen2.5-VL-7B without its LM head."""
    config = skywork_vl_reward_7b()
    ids = jnp.zeros((1, 8), jnp.int32)
    tree = jax.eval_shape(
        lambda: VLRewardModel(config).init(
            jax.random.PRNGKey(0),
            ids,
            jnp.zeros((16, 1176)),
            ((1, 4, 4),),
            jnp.zeros((3, 1, 8), jnp.int32),
            jnp.ones((1, 8), jnp.int32),
        )
    )
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    assert n == 7_747_169_280 + 3584 + 1
