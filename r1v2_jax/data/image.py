"""InternVL image preprocessing: dynamic tiling, bicubic resize, ImageNet normalisation.

``load_image(path, tile_size=448, max_num=12, use_thumbnail=True)`` -> float32
[n_tiles, 3, tile, tile] (NCHW), tiles row-major, then the thumbnail when there is more than
one tile, exactly as the released model's ``dynamic_preprocess`` + transform.

Transparency (``alpha``): the released pipeline opens images with ``convert("RGB")``, which
*drops* alpha (a transparent pixel keeps the colour stored under it, often black). That is
the default (``"drop"``), for parity with the released model. ``"white"`` composites onto
white instead, the same way for every way an image can carry transparency: RGBA, LA, PA,
palette images with a ``transparency`` entry, and L/RGB images with a tRNS colour.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Images above this many million pixels are refused before decoding (decompression bombs);
# 40 MP is an 8K photo with room to spare, half of PIL's own warning level.
DEFAULT_MAX_MEGAPIXELS = 40.0


def pixel_budget_problem(size: tuple[int, int], max_megapixels: float) -> str | None:
    """Why an image of ``size`` (width, height) is over the budget, or None when it fits."""
    w, h = size
    if w * h > max_megapixels * 1e6:
        return f"has {w}x{h} = {w * h / 1e6:.1f} MP, over the pixel budget of {max_megapixels:g} MP"
    return None


ALPHA_MODES = ("drop", "white")
_ALPHA_IMAGE_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """Grids (cols, rows) with min_num <= cols*rows <= max_num, by increasing tile count."""
    ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(ratios, key=lambda r: r[0] * r[1])


def closest_grid(width: int, height: int, ratios, tile_size: int) -> tuple[int, int]:
    """The grid whose aspect ratio is closest to the image's; on a tie the later (larger) grid
    wins when the image has more than half that grid's pixels (InternVL's rule)."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for r in ratios:
        diff = abs(aspect - r[0] / r[1])
        if diff < best_diff:
            best, best_diff = r, diff
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * r[0] * r[1]:
            best = r
    return best


def has_transparency(image) -> bool:
    """Whether a PIL image carries transparency: an alpha band or a palette/tRNS ``transparency``."""
    return image.mode in _ALPHA_IMAGE_MODES or "transparency" in image.info


def to_rgb(image, alpha: str = "drop"):
    """RGB conversion of palette, alpha and greyscale images. ``alpha="drop"``: PIL's
    ``convert("RGB")`` as the released pipeline (alpha ignored); ``"white"``: composited onto white."""

    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha: expected one of {ALPHA_MODES}, got {alpha!r}")
    if alpha == "white" and has_transparency(image):
        rgba = image.convert("RGBA")  # applies palette / tRNS transparency as alpha
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def dynamic_tiles(image, tile_size: int = 448, min_num: int = 1, max_num: int = 12, use_thumbnail: bool = True):
    """Cut a PIL image into tiles as InternVL's ``dynamic_preprocess`` does."""

    w, h = image.size
    cols, rows = closest_grid(w, h, target_ratios(min_num, max_num), tile_size)
    resized = image.resize((tile_size * cols, tile_size * rows), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop(
            ((i % cols) * tile_size, (i // cols) * tile_size, (i % cols + 1) * tile_size, (i // cols + 1) * tile_size)
        )
        for i in range(cols * rows)
    ]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return tiles


def normalize(tile, tile_size: int) -> np.ndarray:
    """PIL tile -> float32 [3, S, S]: bicubic resize to S (identity for tiles already S), [0, 1], ImageNet norm."""

    if tile.size != (tile_size, tile_size):
        tile = tile.resize((tile_size, tile_size), Image.Resampling.BICUBIC)
    x = np.asarray(tile, np.float32) / 255.0
    x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return x.transpose(2, 0, 1)


def preprocess(
    image,
    tile_size: int = 448,
    max_num: int = 12,
    use_thumbnail: bool = True,
    dynamic: bool = True,
    alpha: str = "drop",
) -> np.ndarray:
    """A PIL image -> pixel_values f32[n_tiles, 3, tile_size, tile_size] (``alpha``: see :func:`to_rgb`)."""
    image = to_rgb(image, alpha)
    tiles = dynamic_tiles(image, tile_size, 1, max_num, use_thumbnail) if dynamic else [image]
    return np.stack([normalize(t, tile_size) for t in tiles])


def load_image(path: str, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS, **kw) -> np.ndarray:
    """An image file -> pixel_values; an unreadable image or one over the pixel budget is a
    ValueError naming the file."""

    try:
        with Image.open(path) as im:
            too_big = pixel_budget_problem(im.size, max_megapixels)
            if too_big:
                raise ValueError(too_big)
            im.load()
            return preprocess(im, **kw)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from None


def image_settings(model_dir: str) -> dict:
    """Preprocessing settings from a released checkpoint's config.json: tile size
    (``force_image_size`` or the ViT's ``image_size``), ``dynamic_image_size``, ``use_thumbnail``,
    ``min_dynamic_patch`` / ``max_dynamic_patch`` (InternVL defaults where absent)."""

    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        path = os.path.join(model_dir, "hf", "config.json")
    with open(path, encoding="utf-8") as f:
        c = json.load(f)
    vision = c.get("vision_config") or {}
    size = c.get("force_image_size") or vision.get("image_size", 448)
    size = size[0] if isinstance(size, (list, tuple)) else size
    out = {
        "tile_size": int(size),
        "dynamic": bool(c.get("dynamic_image_size", True)),
        "use_thumbnail": bool(c.get("use_thumbnail", True)),
        "min_num": int(c.get("min_dynamic_patch", 1)),
        "max_num": int(c.get("max_dynamic_patch", 12)),
    }
    if not 1 <= out["min_num"] <= out["max_num"]:
        raise ValueError(
            f"{path}: need 1 <= min_dynamic_patch <= max_dynamic_patch, got {out['min_num']}, {out['max_num']}"
        )
    return out
