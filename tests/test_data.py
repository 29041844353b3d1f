"""Data: InternVL tiling and transform, prompts and masks with the real Qwen2 vocabulary,
formats and bad samples, grain pipelines (resume, host sharding, workers), synthetic task."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from r1v2_jax.data.formats import SkipCounter, load_records
from r1v2_jax.data.image import IMAGENET_MEAN, IMAGENET_STD, closest_grid, dynamic_tiles, preprocess, target_ratios
from r1v2_jax.data.pipeline import PipelineConfig, rl_prompt_iterator, sequence_iterator
from r1v2_jax.data.prompt import PromptBuilder, PromptTooLong, chatml
from r1v2_jax.data.synthetic import make_synthetic
from r1v2_jax.data.tokenizer import IMG_CONTEXT, build_qwen2_tokenizer, tiny_tokenizer

# --- the reference algorithm, transcribed from InternVL's inference script --------------------


def ref_find_closest_aspect_ratio(aspect_ratio, target_ratios_, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios_:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def ref_dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    ratios = sorted(ratios, key=lambda x: x[0] * x[1])
    ar = ref_find_closest_aspect_ratio(aspect_ratio, ratios, orig_width, orig_height, image_size)
    target_width, target_height = image_size * ar[0], image_size * ar[1]
    blocks = ar[0] * ar[1]
    resized_img = image.resize((target_width, target_height), Image.Resampling.BICUBIC)
    out = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size,
        )
        out.append(resized_img.crop(box))
    if use_thumbnail and len(out) != 1:
        out.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return out, ar


def ref_transform(tile, size):
    """T.Resize((size, size), BICUBIC) -> ToTensor -> Normalize, in plain PIL + loops over channels."""
    tile = tile.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(tile).astype(np.float64) / 255.0
    out = np.empty((3, size, size))
    for c in range(3):
        out[c] = (arr[:, :, c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
    return out


SIZES = [
    (448, 448),
    (900, 448),
    (448, 900),
    (1000, 300),
    (300, 1000),
    (1344, 896),
    (2000, 500),
    (500, 2000),
    (640, 480),
    (480, 640),
    (1920, 1080),
    (1080, 1920),
    (800, 800),
    (1600, 1600),
    (2240, 448),
    (448, 2240),
    (1200, 400),
    (333, 777),
    (777, 333),
    (1024, 768),
    (768, 1024),
    (3000, 200),
    (200, 3000),
    (1300, 900),
    (900, 1300),
    (50, 60),
    (60, 50),
    (2500, 2500),
    (1792, 448),
    (448, 1344),
    (700, 1700),
    (1500, 1100),
]


@pytest.mark.parametrize("max_num", [6, 12])
def test_tiling_matches_reference_over_many_aspect_ratios(max_num):
    assert len(SIZES) >= 30
    ratios = target_ratios(1, max_num)
    for w, h in SIZES:
        img = Image.new("RGB", (w, h))
        _, ar = ref_dynamic_preprocess(img, max_num=max_num, image_size=448)
        assert closest_grid(w, h, ratios, 448) == ar, (w, h)
        n_ref = ar[0] * ar[1] + (1 if ar[0] * ar[1] > 1 else 0)
        assert len(dynamic_tiles(img, 448, 1, max_num, use_thumbnail=True)) == n_ref


@pytest.mark.parametrize("size", [(130, 70), (56, 56), (40, 150), (200, 90)])
def test_pixel_values_match_reference_transform(size):
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8))
    ours = preprocess(img, tile_size=28, max_num=6, use_thumbnail=True)
    tiles, _ = ref_dynamic_preprocess(img, max_num=6, image_size=28, use_thumbnail=True)
    ref = np.stack([ref_transform(t, 28) for t in tiles])
    assert ours.shape == ref.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


def _transparent_images():
    """One 14x14 image per way of carrying transparency, every pixel black and fully
    transparent, except RGBA's half-transparent one."""
    black_palette = [0, 0, 0] + [255, 0, 0] * 255
    pa = Image.new("PA", (14, 14), (0, 0))
    pa.putpalette(black_palette)
    p_idx = Image.new("P", (14, 14), 0)
    p_idx.putpalette(black_palette)
    p_idx.info["transparency"] = 0  # palette index 0 transparent
    p_tab = Image.new("P", (14, 14), 0)
    p_tab.putpalette(black_palette)
    p_tab.info["transparency"] = bytes([0] + [255] * 255)  # per-index alpha table
    rgb_trns = Image.new("RGB", (14, 14), (0, 0, 0))
    rgb_trns.info["transparency"] = (0, 0, 0)  # tRNS colour
    l_trns = Image.new("L", (14, 14), 0)
    l_trns.info["transparency"] = 0
    return {
        "RGBA": Image.new("RGBA", (14, 14), (0, 0, 0, 0)),
        "LA": Image.new("LA", (14, 14), (0, 0)),
        "PA": pa,
        "P+index": p_idx,
        "P+table": p_tab,
        "RGB+tRNS": rgb_trns,
        "L+tRNS": l_trns,
    }


def _pixel(x):
    return x[0, :, 3, 3] * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)


def test_palette_image_becomes_rgb():
    p = Image.new("P", (20, 20))
    p.putpalette([255, 0, 0] * 256)
    x = preprocess(p, tile_size=14, max_num=1)
    np.testing.assert_allclose(x[0, :, 3, 3], (np.array([1, 0, 0]) - IMAGENET_MEAN) / IMAGENET_STD, rtol=1e-6)


@pytest.mark.parametrize("kind", list(_transparent_images()))
def test_alpha_dropped_by_default_like_the_released_pipeline(kind):
    """The released pipeline's convert("RGB"): transparency ignored, the stored colour kept
    (black here; compositing onto white gave white, a full black-to-white difference)."""
    img = _transparent_images()[kind]
    x = preprocess(img, tile_size=14, max_num=1)
    np.testing.assert_array_equal(x, preprocess(img.convert("RGB"), tile_size=14, max_num=1))
    np.testing.assert_allclose(_pixel(x), 0.0, atol=1e-6)


@pytest.mark.parametrize("kind", list(_transparent_images()))
def test_alpha_composited_on_white_alike_for_every_mode(kind):
    x = preprocess(_transparent_images()[kind], tile_size=14, max_num=1, alpha="white")
    np.testing.assert_allclose(_pixel(x), 1.0, atol=1e-6)


def test_half_alpha_on_white_and_bad_alpha_mode():
    half = Image.new("RGBA", (14, 14), (0, 0, 0, 128))
    y = _pixel(preprocess(half, tile_size=14, max_num=1, alpha="white"))
    np.testing.assert_allclose(y, 127 / 255, atol=1e-6)  # 255 * (1 - 128/255)
    assert np.allclose(
        _pixel(preprocess(Image.new("RGB", (14, 14), (9, 9, 9)), tile_size=14, max_num=1, alpha="white")),
        9 / 255,
        atol=1e-6,
    )  # no transparency: untouched
    with pytest.raises(ValueError, match="alpha"):
        preprocess(half, tile_size=14, max_num=1, alpha="black")
    with pytest.raises(ValueError, match="pipeline alpha"):
        PipelineConfig(batch_size=1, alpha="composite")


# --- tokens ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen():
    return build_qwen2_tokenizer()


def test_real_qwen2_ids(qwen):
    assert qwen.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).ids == [
        151644,
        872,
        198,
        6023,
        151645,
    ]
    assert qwen.encode("Hello world", add_special_tokens=False).ids == [9707, 1879]
    assert qwen.token_to_id("<|endoftext|>") == 151643 and qwen.token_to_id("<think>") == 151667
    text = "Solve: 3/4 + 1/8 = ?  数学"
    assert qwen.decode(qwen.encode(text, add_special_tokens=False).ids) == text


def test_prompt_has_256_context_tokens_per_tile_and_mask_covers_completion(qwen):
    b = PromptBuilder(qwen, tokens_per_tile=256, max_prompt_len=10_000)
    ctx = qwen.token_to_id(IMG_CONTEXT)
    ids, mask, truncated = b.encode_pair(
        "<image>\nCompare with <image>. Which is bigger?", "<think>\nhmm</think> A", [3, 1]
    )
    assert (ids == ctx).sum() == 256 * 4 and not truncated
    # each image's context tokens are contiguous between <img> and </img>
    starts = np.nonzero(ids == qwen.token_to_id("<img>"))[0]
    ends = np.nonzero(ids == qwen.token_to_id("</img>"))[0]
    assert [e - s - 1 for s, e in zip(starts, ends)] == [768, 256]
    completion = qwen.encode("hmm</think> A<|im_end|>", add_special_tokens=False).ids
    np.testing.assert_array_equal(ids[mask], completion)  # the pre-filled <think> is not repeated
    assert not mask[: len(ids) - len(completion)].any()
    prompt = qwen.decode(ids[~mask].tolist(), skip_special_tokens=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")


def test_chat_template_is_used_when_present(qwen):
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    b = PromptBuilder(qwen, 4, template=template)
    assert b.prompt_text("hi", []) == chatml("hi", think=True)
    for own in ("{{ '<think>\\n' }}", "<think>\n"):  # templates that pre-fill <think> themselves
        b2 = PromptBuilder(qwen, 4, template=template + own)
        assert b2.prompt_text("hi", []) == chatml("hi", think=True)


def test_prompt_too_long_and_completion_truncation():
    tok = tiny_tokenizer(255)
    b = PromptBuilder(tok, tokens_per_tile=16, max_prompt_len=40, max_completion_len=5)
    with pytest.raises(PromptTooLong, match="images are never cut"):
        b.encode_prompt("<image>\nquestion", [2])
    ids, trunc = b.encode_completion("a long answer")
    assert trunc and len(ids) == 5


# --- formats, bad samples, pipelines ------------------------------------------------------------


def _write_dataset(root, n=10):
    os.makedirs(root / "img", exist_ok=True)
    recs = []
    for i in range(n):
        Image.fromarray(np.full((30 + i, 40, 3), i * 20, np.uint8)).save(root / "img" / f"{i}.png")
        recs.append({"images": [f"img/{i}.png"], "question": f"<image>\nq{i}", "answer": str(i), "category": "c"})
    return recs


def test_bad_samples_are_skipped_and_counted(tmp_path):
    recs = _write_dataset(tmp_path, 4)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        tmp_path / "img" / "full.jpg"
    )
    (tmp_path / "img" / "trunc.jpg").write_bytes(open(tmp_path / "img" / "full.jpg", "rb").read()[:300])
    (tmp_path / "img" / "empty.png").write_bytes(b"")
    bad = [
        dict(recs[0], images=["img/missing.png"]),
        dict(recs[0], images=["img/trunc.jpg"]),
        dict(recs[0], images=["img/empty.png"]),
        dict(recs[0], images=["../outside.png"]),
        dict(recs[0], question="<image>\n" + "x" * 500),
        {"question": "no answer"},
    ]
    lines = [json.dumps(r) for r in recs[:2] + bad + recs[2:]] + ["{not json"]
    (tmp_path / "rl.jsonl").write_text("\n".join(lines) + "\n")
    skips = SkipCounter()
    records = load_records(str(tmp_path / "rl.jsonl"), "rl", skips)
    assert skips.as_dict() == {"missing_field": 1, "malformed_json": 1}
    b = PromptBuilder(tiny_tokenizer(255), tokens_per_tile=4, max_prompt_len=200)
    cfg = PipelineConfig(batch_size=2, num_epochs=1, length_buckets=(64, 256), process_index=0, process_count=1)
    it = rl_prompt_iterator(records, b, cfg, tile_size=28, skips=skips)
    batches = list(it)
    answers = sorted(a for bt in batches for a in bt["answer"])
    assert answers == ["0", "1", "2", "3"]  # every good sample, the run went on
    assert skips.as_dict() == {
        "missing_field": 1,
        "malformed_json": 1,
        "missing_image": 1,
        "unreadable_image": 1,
        "empty_image": 1,
        "path_outside_root": 1,
        "prompt_too_long": 1,
    }


def test_batches_have_static_shapes(tmp_path):
    recs = _write_dataset(tmp_path, 6)
    (tmp_path / "rl.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    records = load_records(str(tmp_path / "rl.jsonl"), "rl")
    b = PromptBuilder(tiny_tokenizer(255), tokens_per_tile=4)
    cfg = PipelineConfig(
        batch_size=3,
        num_epochs=1,
        length_buckets=(64, 128),
        tiles_bucket=8,
        max_tiles=2,
        process_index=0,
        process_count=1,
    )
    for batch in rl_prompt_iterator(records, b, cfg, tile_size=28):
        assert batch["input_ids"].shape == (3, 64) and batch["pixel_values"].shape[0] % 8 == 0
        n_ctx = (batch["input_ids"] == 255).sum()
        assert n_ctx == batch["num_tiles"].sum() * 4
        assert batch["attention_mask"][:, -1].all()  # left padding


def test_resume_and_host_sharding(tmp_path):
    recs = _write_dataset(tmp_path, 10)
    (tmp_path / "rl.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    records = load_records(str(tmp_path / "rl.jsonl"), "rl")
    b = PromptBuilder(tiny_tokenizer(255), tokens_per_tile=4)

    def make(idx=0, count=1, workers=0):
        cfg = PipelineConfig(
            batch_size=2,
            seed=7,
            num_epochs=3,
            length_buckets=(64,),
            process_index=idx,
            process_count=count,
            worker_count=workers,
        )
        return rl_prompt_iterator(records, b, cfg, tile_size=28)

    full = [bt["answer"] for bt in make()]
    assert len(full) == 15
    it = make()
    head = [next(it)["answer"] for _ in range(6)]
    state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as saved with a checkpoint
    resumed = make()
    resumed.set_state(state)
    assert head + [bt["answer"] for bt in resumed] == full
    # two hosts: each takes its half of every global batch, so host 0's and host 1's batches
    # side by side are the single-host batches (the global batch does not depend on the host count)
    per_host = []
    for idx in range(2):
        per_host.append([bt["answer"] for bt in make(idx, 2)])
    assert len(per_host[0]) == len(per_host[1]) == 15
    assert [a + b_ for a, b_ in zip(per_host[0], per_host[1])] == full
    assert all(len(x) == 1 for x in per_host[0])
    # a partial last global batch: dropped by default, padded by wrapping around when kept
    for drop, want in ((True, 2), (False, 3)):
        cfg = PipelineConfig(
            batch_size=4,
            seed=7,
            num_epochs=1,
            length_buckets=(64,),
            process_index=1,
            process_count=2,
            drop_remainder=drop,
        )
        got = [bt["answer"] for bt in rl_prompt_iterator(records, b, cfg, tile_size=28)]
        assert len(got) == want and all(len(x) == 2 for x in got)
    with pytest.raises(ValueError, match="divisible by the 3 hosts"):
        make(0, 3)
    # worker processes give the same batches
    assert [bt["answer"] for bt in make(workers=2)] == full


def test_parquet_and_hf_arrow_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = _write_dataset(tmp_path, 3)
    table = pa.Table.from_pylist(recs)
    pq.write_table(table, tmp_path / "rl.parquet")
    assert [r["answer"] for r in load_records(str(tmp_path / "rl.parquet"), "rl")] == ["0", "1", "2"]
    hf = tmp_path / "hfds"
    hf.mkdir()
    with pa.OSFile(str(hf / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    got = load_records(str(hf), "rl", root=str(tmp_path))
    assert [r["answer"] for r in got] == ["0", "1", "2"] and got[0]["images"] == ["img/0.png"]


def test_synthetic_task(tmp_path):
    counts = make_synthetic(str(tmp_path / "syn"), 30, seed=3, image_size=112)
    assert counts == {"train": 24, "test": 6}
    recs = load_records(str(tmp_path / "syn" / "train.jsonl"), "rl")
    cats = {r["category"] for r in recs}
    assert cats == {"count", "arith", "compare"} and {r["difficulty"] for r in recs} == {1, 2, 3}
    for r in recs:
        assert os.path.exists(tmp_path / "syn" / r["images"][0]) and r["facts"]
        if r["category"] == "count":
            target = r["question"].split("How many ")[1].split(" are")[0]
            color, shape = target.split()[0], target.split()[1][:-1]
            known = {(f["color"], f["shape"]): f["count"] for f in r["facts"]}
            assert int(r["answer"]) == known.get((color, shape), 0)
        if r["category"] == "compare":
            assert r["answer"] in ("A", "B") and len(r["choices"]) == 2
            sizes = [f["size"] for f in r["facts"]]
            assert (sizes[0] > sizes[1]) == (r["answer"] == "A")
    again = make_synthetic(str(tmp_path / "syn2"), 30, seed=3, image_size=112)
    assert again == counts
    assert open(tmp_path / "syn" / "train.jsonl").read() == open(tmp_path / "syn2" / "train.jsonl").read()
    with pytest.raises(FileExistsError):
        make_synthetic(str(tmp_path / "syn"), 3)


def test_preference_and_sft_batches(tmp_path):
    recs = _write_dataset(tmp_path, 4)
    pref = [
        {"images": r["images"], "prompt": r["question"], "chosen": f"yes {i}", "rejected": "no"}
        for i, r in enumerate(recs)
    ]
    (tmp_path / "pref.jsonl").write_text("\n".join(json.dumps(r) for r in pref))
    tok = tiny_tokenizer(255)
    b = PromptBuilder(tok, tokens_per_tile=4)
    cfg = PipelineConfig(batch_size=2, num_epochs=1, length_buckets=(64,), process_index=0, process_count=1)
    batches = list(
        sequence_iterator(
            load_records(str(tmp_path / "pref.jsonl"), "preference"), b, cfg, kind="preference", tile_size=28
        )
    )
    assert len(batches) == 2
    bt = batches[0]
    for n in ("chosen", "rejected"):
        assert bt[f"{n}_ids"].shape == (2, 64)
        assert not (bt[f"{n}_loss_mask"] & ~bt[f"{n}_mask"]).any()
    row = bt["chosen_ids"][0][bt["chosen_loss_mask"][0]]
    assert tok.decode(row.tolist(), skip_special_tokens=False).startswith("yes ")
    assert (
        tok.decode(bt["rejected_ids"][0][bt["rejected_loss_mask"][0]].tolist(), skip_special_tokens=False)
        == "no<|im_end|>"
    )
    sft = [{"images": r["images"], "prompt": r["question"], "response": "ok"} for r in recs]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in sft))
    bt = next(sequence_iterator(load_records(str(tmp_path / "sft.jsonl"), "sft"), b, cfg, kind="sft", tile_size=28))
    assert bt["response_loss_mask"].sum() == 2 * len(tok.encode("ok<|im_end|>", add_special_tokens=False).ids)


def test_image_settings_from_a_released_config(tmp_path):
    from r1v2_jax.convert.transformers_format import released_config_dict
    from r1v2_jax.data.image import image_settings
    from r1v2_jax.model.config import model_config

    c = released_config_dict(model_config("tiny"))
    c.update(force_image_size=84, max_dynamic_patch=6, use_thumbnail=False)
    (tmp_path / "config.json").write_text(json.dumps(c))
    assert image_settings(str(tmp_path)) == {
        "tile_size": 84,
        "dynamic": True,
        "use_thumbnail": False,
        "min_num": 1,
        "max_num": 6,
    }
    c.update(min_dynamic_patch=7)
    (tmp_path / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="min_dynamic_patch <= max_dynamic_patch"):
        image_settings(str(tmp_path))


# --- one bad record never stops training ---------------------------------------------------------


def _png_header_only(width, height):
    """A PNG that claims width x height pixels in a few dozen bytes (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_every_kind_of_bad_record_is_a_counted_skip(tmp_path):
    recs = _write_dataset(tmp_path, 4)
    (tmp_path / "img" / "bomb.png").write_bytes(_png_header_only(50_000, 50_000))  # 2.5 GP: PIL's own limit
    (tmp_path / "img" / "big.png").write_bytes(_png_header_only(8_000, 8_000))  # 64 MP: over our 40 MP budget
    q = recs[0]
    bad = [
        dict(q, images=[123]),
        dict(q, images=[{"foo": 1}]),
        dict(q, images=[None]),
        dict(q, images=["img/bomb.png"]),
        dict(q, images=["img/big.png"]),
        dict(q, question="<image>\nfirst <image> second"),  # two placeholders, one image
        dict(q, question="what is <IMG_CONTEXT> here?"),
        dict(q, question="hi<|im_end|>\n<|im_start|>system"),
        dict(q, question="<img>x</img>"),
    ]
    lines = [json.dumps(r).encode() for r in recs[:2] + bad + recs[2:]]
    lines.insert(3, b'{"question": "caf\xe9", "answer": "1"}')  # latin-1, not UTF-8: line 4
    (tmp_path / "rl.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    skips = SkipCounter()
    records = load_records(str(tmp_path / "rl.jsonl"), "rl", skips)
    assert skips.as_dict() == {"bad_utf8": 1, "bad_image_entry": 3}
    b = PromptBuilder(tiny_tokenizer(255), tokens_per_tile=4, max_prompt_len=200)
    cfg = PipelineConfig(batch_size=2, num_epochs=1, length_buckets=(64, 256), process_index=0, process_count=1)
    answers = sorted(a for bt in rl_prompt_iterator(records, b, cfg, tile_size=28, skips=skips) for a in bt["answer"])
    assert answers == ["0", "1", "2", "3"]  # every good sample, the run went on
    assert skips.as_dict() == {
        "bad_utf8": 1,
        "bad_image_entry": 3,
        "image_too_large": 2,
        "image_count_mismatch": 1,
        "special_token_in_text": 3,
    }


def test_bad_lines_are_named_by_file_and_line(tmp_path, caplog):
    (tmp_path / "rl.jsonl").write_bytes(b'{"question": "a", "answer": "1"}\n{"question": "\xff", "answer": "2"}\n')
    with caplog.at_level("WARNING", logger="r1v2_jax.data"):
        got = load_records(str(tmp_path / "rl.jsonl"), "rl")
    assert [r["answer"] for r in got] == ["1"]
    assert f"{tmp_path / 'rl.jsonl'}:2: not UTF-8" in caplog.text


def test_pixel_budget_is_a_setting(tmp_path):
    recs = _write_dataset(tmp_path, 2)  # 30x40 and 31x40 pixels
    b = PromptBuilder(tiny_tokenizer(255), tokens_per_tile=4)
    for mp, want_kept in ((0.0012, 1), (1.0, 2)):
        records = [dict(r, _root=str(tmp_path), _where=f"r{i}", images=list(r["images"])) for i, r in enumerate(recs)]
        skips = SkipCounter()
        cfg = PipelineConfig(
            batch_size=1, num_epochs=1, length_buckets=(64,), process_index=0, process_count=1, max_image_megapixels=mp
        )
        kept = sum(len(bt["answer"]) for bt in rl_prompt_iterator(records, b, cfg, tile_size=28, skips=skips))
        assert kept == want_kept and skips.counts["image_too_large"] == 2 - want_kept
    with pytest.raises(ValueError, match="max_image_megapixels"):
        PipelineConfig(batch_size=1, max_image_megapixels=0)
    from r1v2_jax.data.image import load_image

    (tmp_path / "big.png").write_bytes(_png_header_only(8_000, 8_000))
    with pytest.raises(ValueError, match="big.png.*over the pixel budget of 40 MP"):
        load_image(str(tmp_path / "big.png"))


def test_empty_dataset_is_a_clear_error(tmp_path):
    from r1v2_jax.data.formats import EmptyDataset

    (tmp_path / "rl.jsonl").write_text("\n")
    b = PromptBuilder(tiny_tokenizer(255), tokens_per_tile=4)
    cfg = PipelineConfig(batch_size=2, length_buckets=(64,), process_index=0, process_count=1)
    with pytest.raises(EmptyDataset, match="no usable records"):
        rl_prompt_iterator(load_records(str(tmp_path / "rl.jsonl"), "rl"), b, cfg, tile_size=28)
    with pytest.raises(EmptyDataset, match="no usable records"):
        sequence_iterator([], b, cfg, kind="sft", tile_size=28)


def test_a_dataset_with_nothing_usable_stops_with_the_counts(tmp_path):
    """Repeating forever over records that are all unusable must stop, not spin."""
    import threading

    from r1v2_jax.data.formats import TooManySkips

    recs = _write_dataset(tmp_path, 3)
    records = [dict(r, _root=str(tmp_path), _where=f"r{i}", images=["img/gone.png"]) for i, r in enumerate(recs)]
    records[0].update(question="<|im_end|>", images=[])
    b = PromptBuilder(tiny_tokenizer(255), tokens_per_tile=4)
    cfg = PipelineConfig(batch_size=2, length_buckets=(64,), process_index=0, process_count=1, max_consecutive_skips=30)
    it = rl_prompt_iterator(records, b, cfg, tile_size=28)
    result = {}

    def pull():
        try:
            next(it)
        except Exception as e:  # noqa: BLE001 - what it raises is the point
            result["error"] = e

    t = threading.Thread(target=pull, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the iterator spun on a dataset with nothing usable"
    err = result["error"]
    assert isinstance(err, TooManySkips) and "30 samples in a row" in str(err)
    assert "'missing_image': 20" in str(err) and "'special_token_in_text': 10" in str(err)


def test_special_tokens_in_text_never_become_tokens():
    from r1v2_jax.data.prompt import SpecialTokenInText

    tok = tiny_tokenizer(255)
    b = PromptBuilder(tok, tokens_per_tile=4)
    for text in (
        "<IMG_CONTEXT>",
        "a <img> b",
        "x<|im_end|>y",
        "<|endoftext|>",
        "<|im_start|>system",
        "</img>",
        "<think>",
    ):
        with pytest.raises(SpecialTokenInText, match="special token"):
            b.encode_prompt(f"question {text}?", [])
    for text in ("a<|im_end|>b", "<IMG_CONTEXT>x", "<|im_start|>user"):
        with pytest.raises(SpecialTokenInText):
            b.encode_completion(text)
    # a completion's own reasoning tags and its trailing eos are fine: the eos is the closing token, once
    ids, _ = b.encode_completion("r</think>\\boxed{2}<|im_end|>")
    assert ids == tok.encode("r</think>\\boxed{2}<|im_end|>", add_special_tokens=False).ids
    assert ids.count(tok.token_to_id("<|im_end|>")) == 1
    # MPO drops sampled candidates the same way before pairing them
    assert b.completion_special_token("a<img>b<|im_end|>") == "<img>"
    assert b.completion_special_token("r</think>x<|endoftext|>") is None
    ok = b.encode_prompt("<image>\nHow many?", [1])
    assert ok.count(255) == 4  # the image's own context tokens only
