"""``r1v2 generate`` end to end on a tiny model with a small tokenizer, and the image preprocessing."""

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer

import r1v2_jax
from r1v2_jax.cli import main
from r1v2_jax.data.image import IMAGENET_MEAN, IMAGENET_STD, closest_grid, preprocess, target_ratios
from r1v2_jax.data.prompt import chatml, expand_images
from r1v2_jax.data.tokenizer import tiny_tokenizer
from r1v2_jax.model.config import model_config


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    cfg = model_config("tiny")
    model = r1v2_jax.init_model(cfg, seed=4)
    r1v2_jax.save_released(model, str(d / "model"))
    tiny_tokenizer(cfg.image_token_id).save(str(d / "model" / "tokenizer.json"))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 90, 3), np.uint8)).save(d / "img.png")
    return d, model


def test_generate_command_prints_the_greedy_answer(tiny_dir, capsys):
    d, model = tiny_dir
    rc = main(
        [
            "generate",
            "--model",
            str(d / "model"),
            "--image",
            str(d / "img.png"),
            "--prompt",
            "How many?",
            "--temperature",
            "0",
            "--max-new-tokens",
            "12",
            "--max-tiles",
            "2",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr()
    # The same call through the API:
    tok = Tokenizer.from_file(str(d / "model" / "tokenizer.json"))
    cfg = model.config
    pix = preprocess(Image.open(d / "img.png"), tile_size=cfg.tile_size, max_num=2)
    assert pix.shape == (3, 3, 56, 56)  # a wide image: 2x1 grid + thumbnail
    text = expand_images("<image>\nHow many?", [3], cfg.tokens_per_tile())
    ids = tok.encode(chatml(text), add_special_tokens=False).ids
    assert ids.count(cfg.image_token_id) == 3 * cfg.tokens_per_tile()
    out = r1v2_jax.generate(
        model,
        [ids],
        pixel_values=pix,
        max_new_tokens=12,
        repetition_penalty=1.05,
        eos_ids=[tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")],
    )
    gen = np.asarray(out.tokens)[0, len(ids) : len(ids) + int(out.lengths[0])].tolist()
    if bool(out.finished[0]):
        gen = gen[:-1]
    assert printed.out.rstrip("\n") == tok.decode(gen, skip_special_tokens=False)
    assert "tokens in" in printed.err
    # the paged engine prints the same answer, and so does it sampling at temperature 1 with a seed
    argv = ["generate", "--model", str(d / "model"), "--image", str(d / "img.png"), "--prompt", "How many?"]
    argv += ["--max-new-tokens", "12", "--max-tiles", "2"]
    assert main(argv + ["--temperature", "0", "--engine"]) == 0
    assert capsys.readouterr().out == printed.out
    assert main(argv + ["--temperature", "1", "--seed", "3"]) == 0
    sampled = capsys.readouterr().out
    assert main(argv + ["--temperature", "1", "--seed", "3", "--engine"]) == 0
    assert capsys.readouterr().out == sampled


def test_generate_refuses_a_prompt_spelling_a_special_token(tiny_dir, capsys):
    d, _ = tiny_dir
    rc = main(["generate", "--model", str(d / "model"), "--prompt", "hi<|im_end|>", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --prompt:") and "Traceback" not in err, err


def test_generate_from_our_checkpoint(tiny_dir, capsys):
    from r1v2_jax.convert.converters import hf_to_jax

    d, _ = tiny_dir
    hf_to_jax(str(d / "model"), str(d / "ours"))
    rc = main(["generate", "--model", str(d / "ours"), "--prompt", "hi", "--temperature", "0", "--max-new-tokens", "5"])
    assert rc == 0


def test_tiling_grid_choice():
    ratios = target_ratios(1, 12)
    assert ratios[0] == (1, 1) and max(r[0] * r[1] for r in ratios) == 12
    assert closest_grid(448, 448, ratios, 448) == (1, 1)
    assert closest_grid(900, 448, ratios, 448) == (2, 1)
    assert closest_grid(448, 1400, ratios, 448) == (1, 3)
    # a tie between (1,1), (2,2), (3,3)...: a big square image takes the largest grid it fills
    assert closest_grid(2000, 2000, ratios, 448) == (3, 3)


def test_normalisation_and_rgb_conversion():
    clear = Image.new("RGBA", (56, 56), (0, 0, 0, 0))  # fully transparent black
    x = preprocess(clear, tile_size=56, max_num=1)  # alpha dropped, as the released convert("RGB"): black
    assert x.shape == (1, 3, 56, 56)
    np.testing.assert_allclose(x[0, :, 0, 0], -np.array(IMAGENET_MEAN) / np.array(IMAGENET_STD), rtol=1e-6)
    x = preprocess(clear, tile_size=56, max_num=1, alpha="white")  # composited: a white background
    np.testing.assert_allclose(x[0, :, 0, 0], (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), rtol=1e-6)
    grey = preprocess(Image.new("L", (56, 56), 0), tile_size=56, max_num=1)
    np.testing.assert_allclose(grey[0, :, 5, 5], -np.array(IMAGENET_MEAN) / np.array(IMAGENET_STD), rtol=1e-6)


def test_placeholder_count_must_match():
    with pytest.raises(ValueError, match="1 <image> placeholder"):
        expand_images("<image> and", [1, 2], 4)


def test_eval_command_prints_pass_at_1_per_category(tiny_dir, tmp_path, capsys):
    from r1v2_jax.data.synthetic import make_synthetic

    d, model = tiny_dir
    make_synthetic(str(tmp_path / "data"), 6, seed=0, image_size=56, test_fraction=0.5)
    rc = main(
        [
            "eval",
            "--model",
            str(d / "model"),
            "--data",
            str(tmp_path / "data" / "test.jsonl"),
            "--k",
            "2",
            "--temperature",
            "1.0",
            "--max-new-tokens",
            "8",
            "--max-tiles",
            "1",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "pass@1 (mean over k=2 samples" in out
    lines = [ln for ln in out.splitlines() if "|" in ln]
    assert lines[0].split("|")[0].strip() == "category" and lines[-1].split("|")[0].strip() == "all"
    assert float(lines[-1].split("|")[1]) == 0.0  # an untrained model answers nothing right
    assert int(lines[-1].split("|")[2]) == 3


def test_eval_command_reports_skipped_items(tiny_dir, tmp_path, capsys):
    """Items left out while preparing prompts are in the printed results, not only in the log."""
    from r1v2_jax.data.synthetic import make_synthetic

    d, _ = tiny_dir
    make_synthetic(str(tmp_path / "data"), 6, seed=0, image_size=56, test_fraction=0.5)
    path = tmp_path / "data" / "test.jsonl"
    good = path.read_text().splitlines()
    first = __import__("json").loads(good[0])
    extra = [dict(first, images=["gone.png"]), dict(first, question="<IMG_CONTEXT> tell me")]
    path.write_text("\n".join(good + [__import__("json").dumps(r) for r in extra]) + "\n")
    rc = main(
        [
            "eval",
            "--model",
            str(d / "model"),
            "--data",
            str(path),
            "--k",
            "1",
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
            "--max-tiles",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert int(next(ln for ln in out.splitlines() if ln.startswith("all")).split("|")[2]) == 3
    assert "skipped items: 2 {'missing_image': 1, 'special_token_in_text': 1}" in out
