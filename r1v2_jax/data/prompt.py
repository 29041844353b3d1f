"""Prompt building: ``<image>`` placeholders and the chat format."""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


def expand_images(text: str, tiles_per_image: list[int], tokens_per_tile: int) -> str:
    """Replace the i-th ``<image>`` by ``<img>`` + ``<IMG_CONTEXT>`` x (tokens_per_tile * tiles_i)
    + ``</img>``. The number of placeholders must equal the number of images."""
    n = text.count(IMAGE_PLACEHOLDER)
    if n != len(tiles_per_image):
        raise ValueError(f"prompt has {n} {IMAGE_PLACEHOLDER} placeholder(s) for {len(tiles_per_image)} image(s)")
    for tiles in tiles_per_image:
        text = text.replace(IMAGE_PLACEHOLDER, IMG_START + IMG_CONTEXT * (tokens_per_tile * tiles) + IMG_END, 1)
    return text


def chatml(user: str, think: bool = True) -> str:
    """ChatML with the assistant turn opened (and ``<think>\\n`` pre-filled for reasoning)."""
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n" + ("<think>\n" if think else "")
