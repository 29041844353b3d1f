"""Converters of public training sets (verl / EasyR1 RL parquet, InternVL MMPR preference
pairs) into our rl / preference JSONL, on fixtures in the published layouts."""

import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from r1v2_jax import cli
from r1v2_jax.data import public_formats as pf
from r1v2_jax.data.formats import SkipCounter, load_records, open_image


def png(color=(255, 0, 0), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.fixture
def easyr1_parquet(tmp_path):
    """hiyouga/geometry3k's layout: images (list of image structs), problem, answer."""
    src = tmp_path / "geometry3k" / "data"
    src.mkdir(parents=True)
    Image.new("RGB", (5, 5), (0, 0, 255)).save(src / "on_disk.png")
    rows = [
        {"images": [{"bytes": png(), "path": None}], "problem": "<image>Find x.", "answer": "3"},
        {"images": [{"bytes": png((0, 255, 0)), "path": None}], "problem": "Find the area.", "answer": "12"},
        {"images": [], "problem": "What is 2+2?", "answer": "4"},
        {"images": [{"bytes": None, "path": "on_disk.png"}], "problem": "<image> angle?", "answer": "30"},
        {"images": [{"bytes": png(), "path": None}], "problem": "<image>x", "answer": None},  # missing_field
        {"images": [{"bytes": b"not an image", "path": None}], "problem": "<image>y", "answer": "1"},  # unreadable
        {"images": [{"bytes": png(), "path": None}], "problem": "<image><image>z", "answer": "1"},  # mismatch
        {"images": [{"bytes": None, "path": "gone.png"}], "problem": "<image>w", "answer": "1"},  # missing_image
        {"images": [{"bytes": None, "path": "../../../etc/passwd"}], "problem": "<image>v", "answer": "1"},  # escape
        {"images": [], "problem": "   ", "answer": "1"},  # empty_question
    ]
    schema = pa.schema([("images", pa.list_(IMAGE_STRUCT)), ("problem", pa.string()), ("answer", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), src / "train-00000-of-00001.parquet")
    return src


@pytest.fixture
def verl_parquet(tmp_path):
    """verl's examples/data_preprocess/geo3k.py output: prompt chat list, images, reward_model."""
    rows = [
        {
            "data_source": "hiyouga/geometry3k",
            "prompt": [
                {"role": "system", "content": "Think first."},
                {"role": "user", "content": "<image>Find y. Put the final answer in \\boxed{}."},
            ],
            "images": [{"bytes": png(), "path": None}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": "7"},
            "extra_info": {"split": "train", "index": 0},
        },
        {
            "data_source": "hiyouga/geometry3k",
            "prompt": [{"role": "user", "content": "<image>Find z."}],
            "images": [{"bytes": png(), "path": None}],
            "ability": "math",
            "reward_model": None,  # missing_field
            "extra_info": {"split": "train", "index": 1},
        },
        {
            "data_source": "text",
            "prompt": [{"role": "assistant", "content": "no user turn"}],  # missing_field
            "images": [],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": "1"},
            "extra_info": {"split": "train", "index": 2},
        },
    ]
    schema = pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("images", pa.list_(IMAGE_STRUCT)),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
            ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64())])),
        ]
    )
    path = tmp_path / "verl_train.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_easyr1_layout_to_rl(easyr1_parquet, tmp_path):
    out = tmp_path / "out"
    skips = SkipCounter()
    res = pf.convert_rl(str(easyr1_parquet), str(out), skips=skips)
    assert res["written"] == 4 and res["images"] == 3
    assert skips.as_dict() == {
        "missing_field": 1,
        "unreadable_image": 1,
        "image_placeholder_mismatch": 1,
        "missing_image": 1,
        "path_outside_root": 1,
        "empty_question": 1,
    }
    recs = load_records(str(out / "data.jsonl"), "rl", s := SkipCounter())
    assert s.total == 0
    assert [(r["question"], r["answer"], len(r["images"])) for r in recs] == [
        ("<image>Find x.", "3", 1),
        ("<image>\nFind the area.", "12", 1),  # a placeholder put in front
        ("What is 2+2?", "4", 0),
        ("<image> angle?", "30", 1),
    ]
    assert open_image(recs[0], recs[0]["images"][0]).getpixel((0, 0)) == (255, 0, 0)
    assert open_image(recs[1], recs[1]["images"][0]).getpixel((0, 0)) == (0, 255, 0)
    assert open_image(recs[3], recs[3]["images"][0]).size == (5, 5)  # linked from the source folder
    assert sorted(os.listdir(tmp_path)) == ["geometry3k", "out"]  # no temp folder left beside it


def test_verl_layout_to_rl(verl_parquet, tmp_path):
    skips = SkipCounter()
    res = pf.convert_rl(str(verl_parquet), str(tmp_path / "out"), skips=skips)
    assert res["written"] == 1 and skips.as_dict() == {"missing_field": 2}
    (rec,) = load_records(str(tmp_path / "out" / "data.jsonl"), "rl")
    assert rec["question"] == "<image>Find y. Put the final answer in \\boxed{}." and rec["answer"] == "7"
    assert rec["category"] == "hiyouga/geometry3k" and rec["meta"] == {"system": "Think first."}


def test_nothing_is_overwritten_without_overwrite_and_a_failed_build_leaves_nothing(
    easyr1_parquet, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        pf.convert_rl(str(easyr1_parquet), str(out))
    assert os.listdir(out) == ["keep.txt"]
    pf.convert_rl(str(easyr1_parquet), str(out), overwrite=True)
    assert sorted(os.listdir(out)) == ["data.jsonl", "images"]

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pf, "_place_images", boom)
    with pytest.raises(RuntimeError):
        pf.convert_rl(str(easyr1_parquet), str(tmp_path / "new"))
    with pytest.raises(RuntimeError):
        pf.convert_rl(str(easyr1_parquet), str(out), overwrite=True)
    assert not (tmp_path / "new").exists()
    assert sorted(os.listdir(out)) == ["data.jsonl", "images"]  # the old complete copy is untouched
    assert sorted(os.listdir(tmp_path)) == ["geometry3k", "out"]


@pytest.fixture
def mmpr(tmp_path):
    """MMPR's layout: meta.json -> {name: {root, annotation}}; annotation lines image/question/chosen/rejected."""
    base = tmp_path / "MMPR"
    (base / "images" / "geo" / "a").mkdir(parents=True)
    (base / "annotations").mkdir()
    for name, color in (("a/1.png", (255, 0, 0)), ("a/2.png", (0, 0, 255))):
        Image.new("RGB", (4, 4), color).save(base / "images" / "geo" / name)
    geo = [
        {"image": "a/1.png", "question": "What color?", "chosen": "Red.", "rejected": "Blue."},
        {"image": "a/1.png", "question": "<image>\nIs it red?", "chosen": "Yes.", "rejected": "No."},  # same image
        {"image": ["a/1.png", "a/2.png"], "question": "<image> vs <image>: which is red?", "chosen": "First.",
         "rejected": "Second.", "system_prompt": "Be brief."},
        {"image": "a/1.png", "question": "Q", "chosen": "same", "rejected": "same"},  # identical_pair
        {"image": "a/missing.png", "question": "Q", "chosen": "x", "rejected": "y"},  # missing_image
        {"image": "a/1.png", "question": "Q", "chosen": 3, "rejected": "y"},  # wrong_type
        {"image": ["a/1.png", "a/2.png"], "question": "<image> only one", "chosen": "x", "rejected": "y"},  # mismatch
    ]  # fmt: skip
    text = [{"question": "2+2?", "chosen": "4", "rejected": "5"}]
    with open(base / "annotations" / "geo.jsonl", "w") as f:
        for r in geo:
            f.write(json.dumps(r) + "\n")
        f.write("{broken\n")
    with open(base / "annotations" / "text.jsonl", "w") as f:
        f.write(json.dumps(text[0]) + "\n")
    meta = {
        "geo_pairs": {"root": "images/geo", "annotation": "annotations/geo.jsonl", "repeat_time": 1, "length": 7},
        "text_pairs": {"root": "", "annotation": "annotations/text.jsonl", "repeat_time": 1, "length": 1},
    }
    (base / "meta.json").write_text(json.dumps(meta))
    return base


def test_mmpr_to_preference(mmpr, tmp_path):
    skips = SkipCounter()
    res = pf.convert_mmpr(str(mmpr / "meta.json"), str(tmp_path / "out"), skips=skips)
    assert res["written"] == 4 and res["images"] == 2  # a/1.png linked once for three pairs
    assert skips.as_dict() == {
        "identical_pair": 1,
        "missing_image": 1,
        "wrong_type": 1,
        "image_placeholder_mismatch": 1,
        "malformed_json": 1,
    }
    recs = load_records(str(tmp_path / "out" / "data.jsonl"), "preference", s := SkipCounter())
    assert s.total == 0
    assert [(r["prompt"], r["chosen"], len(r["images"]), r["category"]) for r in recs] == [
        ("<image>\nWhat color?", "Red.", 1, "geo_pairs"),
        ("<image>\nIs it red?", "Yes.", 1, "geo_pairs"),
        ("<image> vs <image>: which is red?", "First.", 2, "geo_pairs"),
        ("2+2?", "4", 0, "text_pairs"),
    ]
    assert recs[2]["meta"] == {"system": "Be brief."}
    assert [open_image(recs[2], im).getpixel((0, 0)) for im in recs[2]["images"]] == [(255, 0, 0), (0, 0, 255)]
    # one annotation file, its images under --image-root
    res = pf.convert_mmpr(
        str(mmpr / "annotations" / "geo.jsonl"), str(tmp_path / "one"), image_root=str(mmpr / "images" / "geo")
    )
    assert res["written"] == 3
    # InternVL's own meta files name paths from the folder above: MMPR/images/..., MMPR/annotations/...
    (mmpr / "meta_internvl.json").write_text(
        json.dumps({"geo": {"root": "MMPR/images/geo", "annotation": "MMPR/annotations/geo.jsonl", "repeat_time": 1}})
    )
    assert pf.convert_mmpr(str(mmpr / "meta_internvl.json"), str(tmp_path / "iv"))["written"] == 3


def test_make_data_cli(easyr1_parquet, mmpr, tmp_path, capsys):
    assert cli.main(["make-data", "easyr1", str(tmp_path / "rl"), "--from", str(easyr1_parquet)]) == 0
    out = capsys.readouterr().out
    assert "4 rl records, 3 images" in out and "skipped: 6" in out
    assert cli.main(["make-data", "easyr1", str(tmp_path / "rl"), "--from", str(easyr1_parquet)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["make-data", "mmpr", str(tmp_path / "pref"), "--from", str(mmpr / "meta.json")]) == 0
    assert "4 preference records" in capsys.readouterr().out
    assert cli.main(["make-data", "mmpr", str(tmp_path / "x"), "--from", str(tmp_path / "nope.json")]) == 2
    assert cli.main(["make-data", "easyr1", str(tmp_path / "y")]) == 2
    assert cli.main(["make-data", "synthetic", str(tmp_path / "z")]) == 2
    assert cli.main(["make-data", "synthetic", str(tmp_path / "z"), "--n", "3", "--image-size", "64"]) == 0
