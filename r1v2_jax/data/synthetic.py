"""A synthetic visual-reasoning task with exactly known answers, for RL on a laptop.

``make_synthetic(out_dir, n, seed)`` renders ``n`` images and writes ``train.jsonl`` /
``test.jsonl`` (``rl`` records: images, question, answer, choices, category, difficulty,
facts). Three task families, each with graded difficulty (1-3):

* ``count``:   "How many red circles are there?" — shapes of several colours; more objects
               and distractors at higher difficulty. Answer: an integer.
* ``arith``:   two or three numbers drawn as digits; "What is the sum / difference / product
               ...?" Answer: an integer.
* ``compare``: two shapes of different colours and sizes; "Which is larger ...? A. red B.
               blue" Answer: a choice letter.
* ``color``:   (not in the default mix; the CPU demo's task) "What colour is the large
               shape?" Answer: the colour's name.

``facts`` lists true statements about each image (``{"kind": "count", "color", "shape",
"count"}``, ``{"kind": "number", "value"}``, ``{"kind": "size", "color", "shape", "size"}``)
for hallucination probing: an answer claiming a different count or number contradicts them.
"""

from __future__ import annotations

import json
import os
import random

from PIL import Image, ImageDraw, ImageFont

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
CATEGORIES = ("count", "arith", "compare")
ALL_CATEGORIES = CATEGORIES + ("color",)


def _draw_shape(draw, shape: str, cx: float, cy: float, r: float, color) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)


def _place(rng: random.Random, placed: list, size: int, r: float) -> tuple[float, float] | None:
    for _ in range(200):
        cx, cy = rng.uniform(r + 2, size - r - 2), rng.uniform(r + 2, size - r - 2)
        if all((cx - x) ** 2 + (cy - y) ** 2 > (r + rr + 4) ** 2 for x, y, rr in placed):
            placed.append((cx, cy, r))
            return cx, cy
    return None


def _count_task(rng, draw, size, difficulty):
    target_color, target_shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    n_target = rng.randint(1, 2 + 2 * difficulty)
    n_other = rng.randint(0, 2 * difficulty)
    placed, counts = [], {}
    objs = [(target_color, target_shape)] * n_target
    for _ in range(n_other):
        c, s = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if (c, s) != (target_color, target_shape):
            objs.append((c, s))
    r = size / (10 + 2 * difficulty)
    for c, s in objs:
        pos = _place(rng, placed, size, r)
        if pos is None:
            continue
        _draw_shape(draw, s, pos[0], pos[1], r, COLORS[c])
        counts[(c, s)] = counts.get((c, s), 0) + 1
    n = counts.get((target_color, target_shape), 0)
    facts = [{"kind": "count", "color": c, "shape": s, "count": k} for (c, s), k in sorted(counts.items())]
    return f"How many {target_color} {target_shape}s are there in the image?", str(n), [], facts


def _font(size: int):

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow without sized default fonts
        return ImageFont.load_default()


def _arith_task(rng, draw, size, difficulty):
    k = 2 if difficulty < 3 else 3
    hi = 10**difficulty
    nums = [rng.randint(1, hi - 1) for _ in range(k)]
    op = rng.choice(["sum", "difference", "product"] if difficulty > 1 else ["sum", "difference"])
    if op == "difference":
        nums = sorted(nums, reverse=True)
    font = _font(max(12, size // 8))
    for i, v in enumerate(nums):
        draw.text((size * 0.1 + i * size * 0.3, size * (0.3 + 0.2 * (i % 2))), str(v), fill=(0, 0, 0), font=font)
    if op == "sum":
        ans, q = sum(nums), "What is the sum of the numbers in the image?"
    elif op == "difference":
        ans = nums[0] - sum(nums[1:])
        q = "Subtract the other numbers in the image from the largest one. What is the result?"
    else:
        ans = 1
        for v in nums:
            ans *= v
        q = "What is the product of the numbers in the image?"
    return q, str(ans), [], [{"kind": "number", "value": v} for v in nums]


def _compare_task(rng, draw, size, difficulty):
    c1, c2 = rng.sample(list(COLORS), 2)
    s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
    base = size / 8
    gap = base * (0.6 / difficulty)  # smaller size differences are harder
    r1 = base + rng.uniform(0, base * 0.5)
    r2 = r1 + gap if rng.random() < 0.5 else max(r1 - gap, base * 0.3)
    placed = []
    for c, s, r in ((c1, s1, r1), (c2, s2, r2)):
        pos = _place(rng, placed, size, r) or (size / 2, size / 2)
        _draw_shape(draw, s, pos[0], pos[1], r, COLORS[c])
    larger = "A" if r1 > r2 else "B"
    q = f"Which shape is larger: the {c1} {s1} or the {c2} {s2}?"
    facts = [
        {"kind": "size", "color": c1, "shape": s1, "size": round(r1, 1)},
        {"kind": "size", "color": c2, "shape": s2, "size": round(r2, 1)},
    ]
    return q, larger, [f"the {c1} {s1}", f"the {c2} {s2}"], facts


def _color_task(rng, draw, size, difficulty):
    """Name the colour of the (largest) shape; more small distractors at higher difficulty."""
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    placed = []
    r = size / 4
    pos = _place(rng, placed, size, r) or (size / 2, size / 2)
    _draw_shape(draw, shape, pos[0], pos[1], r, COLORS[color])
    others = [c for c in COLORS if c != color]
    for _ in range(difficulty - 1):
        p2 = _place(rng, placed, size, r / 3)
        if p2 is not None:
            _draw_shape(draw, rng.choice(SHAPES), p2[0], p2[1], r / 3, COLORS[rng.choice(others)])
    facts = [{"kind": "color", "color": color, "shape": shape}]
    return "What colour is the large shape?", color, [], facts


_TASKS = {"count": _count_task, "arith": _arith_task, "compare": _compare_task, "color": _color_task}


def make_example(rng: random.Random, image_size: int, category: str, difficulty: int):
    """(PIL image, record without the image path)."""

    img = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    q, ans, choices, facts = _TASKS[category](rng, ImageDraw.Draw(img), image_size, difficulty)
    if choices:
        q = q + "\n" + "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))
    return img, {
        "question": "<image>\n" + q,
        "answer": ans,
        "choices": choices,
        "category": category,
        "difficulty": difficulty,
        "facts": facts,
    }


def make_synthetic(
    out_dir: str,
    n: int,
    *,
    seed: int = 0,
    image_size: int = 448,
    test_fraction: float = 0.2,
    overwrite: bool = False,
    categories: tuple[str, ...] = CATEGORIES,
    max_difficulty: int = 3,
) -> dict[str, int]:
    """Write ``n`` examples (images under ``images/``) split into train.jsonl / test.jsonl."""
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    unknown = set(categories) - set(ALL_CATEGORIES)
    if unknown or not categories:
        raise ValueError(f"categories: expected a non-empty subset of {ALL_CATEGORIES}, got {categories}")
    if not 1 <= max_difficulty <= 3:
        raise ValueError(f"max_difficulty: must be 1, 2 or 3, got {max_difficulty}")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: exists and is not empty (use --overwrite)")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rng = random.Random(seed)
    n_test = max(1, int(round(n * test_fraction))) if n > 1 else 0
    splits = {"train": [], "test": []}
    for i in range(n):
        category = categories[i % len(categories)]
        difficulty = 1 + (i // len(categories)) % max_difficulty
        img, rec = make_example(rng, image_size, category, difficulty)
        name = f"images/{i:06d}.png"
        img.save(os.path.join(out_dir, name))
        rec = {"images": [name], **rec, "id": i}
        splits["test" if i >= n - n_test else "train"].append(rec)
    for split, recs in splits.items():
        with open(os.path.join(out_dir, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
    return {k: len(v) for k, v in splits.items()}
