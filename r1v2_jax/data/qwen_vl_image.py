"""Qwen2.5-VL image preprocessing and chat template (the inputs of Skywork-VL-Reward).

As transformers' Qwen2-VL image processor (PIL backend, ``Qwen2VLImageProcessorPil``; the
numerics of the released slow processor): :func:`smart_resize` to multiples of
``patch_size · merge_size`` = 28 with the pixel count within ``[min_pixels, max_pixels]``,
PIL bicubic resize of the RGB image, rescale by 1/255 (in float64, then float32), CLIP
mean/std normalisation, and patch flattening: patches of 14×14 ordered by 2×2 merge block
(block row, block column, row in block, column in block), each flattened as (channel,
frame, row, column) with the image repeated over the ``temporal_patch_size`` = 2 frames.
Result: ``pixel_values`` f32[Σ h·w, 3·2·14·14] and grids ``(1, h, w)`` per image (patches).

The prompt: Qwen2.5-VL's chat template, where an image is
``<|vision_start|>`` + ``<|image_pad|>`` × (t·h·w / merge²) + ``<|vision_end|>``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
DEFAULT_SYSTEM = "You are a helpful assistant."


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """(height, width) rounded to multiples of ``factor``, aspect ratio kept as closely as
    possible, pixel count brought within [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"smart_resize: aspect ratio {max(height, width) / min(height, width):.1f} exceeds 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(image: np.ndarray, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2):
    """image f32[C, H, W] -> (f32[gh·gw, C·T·P·P], gh, gw) in the processor's order."""
    c, h, w = image.shape
    gh, gw = h // patch_size, w // patch_size
    p = image.reshape(c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    p = p.transpose(1, 4, 2, 5, 0, 3, 6)  # (bh, bw, mh, mw, C, ph, pw)
    p = np.broadcast_to(p[:, :, :, :, :, None], p.shape[:5] + (temporal_patch_size,) + p.shape[5:])
    return np.ascontiguousarray(p).reshape(gh * gw, c * temporal_patch_size * patch_size**2), gh, gw


def preprocess_image(
    image: Image.Image,
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One PIL image -> (pixel_values f32[h·w, 3·T·P·P], grid (1, h, w))."""
    rgb = image.convert("RGB")
    height, width = smart_resize(rgb.height, rgb.width, patch_size * merge_size, min_pixels, max_pixels)
    if (height, width) != (rgb.height, rgb.width):
        rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
    x = (np.asarray(rgb).astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    patches, gh, gw = patchify(x.transpose(2, 0, 1), patch_size, merge_size, temporal_patch_size)
    return patches, (1, gh, gw)


def preprocess_images(images: Sequence[Image.Image], **kw) -> tuple[np.ndarray, tuple[tuple[int, int, int], ...]]:
    """Images in order -> (pixel_values f32[Σ h·w, 3·T·P·P] concatenated, grids)."""
    out = [preprocess_image(im, **kw) for im in images]
    if not out:
        return np.zeros((0, 3 * kw.get("temporal_patch_size", 2) * kw.get("patch_size", 14) ** 2), np.float32), ()
    return np.concatenate([p for p, _ in out]), tuple(g for _, g in out)


def image_placeholder(grid: tuple[int, int, int], merge_size: int = 2) -> str:
    """``<|vision_start|><|image_pad|>…<|vision_end|>`` with t·h·w / merge² pads."""
    t, h, w = grid
    return VISION_START + IMAGE_PAD * (t * h * w // merge_size**2) + VISION_END


def chat_prompt(
    question: str,
    response: str | None,
    grids: Sequence[tuple[int, int, int]] = (),
    *,
    system: str = DEFAULT_SYSTEM,
    merge_size: int = 2,
) -> str:
    """Qwen2.5-VL's chat template (as ``apply_chat_template`` renders it, with its default
    system prompt) for one user turn (images first, then the question) and, when ``response``
    is given, the assistant's answer rendered as ``{response}<|im_end|>\n`` (the text a reward
    model scores; the value head reads whatever token the tokenized text ends with)."""
    images = "".join(image_placeholder(g, merge_size) for g in grids)
    text = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{images}{question}<|im_end|>\n"
    text += "<|im_start|>assistant\n"
    if response is not None:
        text += f"{response}<|im_end|>\n"
    return text
