"""What every benchmark provides: items in our ``rl`` record shape, and a scoring rule.

A benchmark module reads a local copy of the data set in the layout its publishers ship on
the Hugging Face Hub (parquet / arrow files of a snapshot, or a ``save_to_disk`` folder; see
:func:`r1v2_jax.data.formats.iter_records`), builds each question's prompt the way the
benchmark's reference evaluation does, and scores a response by that evaluation's rules.

Items are plain ``rl`` records (``question``, ``answer``, ``images``, ``choices``,
``category``) so that the sampling pipeline needs nothing new, plus:

* ``id``: unique and stable across reads of the same data (resumed runs key on it);
* ``meta``: what the scoring rule needs besides ``answer`` (answer type, precision, unit,
  several accepted answers, tests for code...), JSON-serialisable;
* ``breakdown``: ``{axis: value}`` for per-category / per-subject tables.

``question`` holds one ``<image>`` placeholder per entry of ``images``, in order (a
benchmark's own ``<image N>`` markers are mapped to them). Images are HF image dicts
(``{"bytes": ...}`` or ``{"path": ...}``), resolved under ``_root``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from r1v2_jax.data.formats import SkipCounter


@dataclasses.dataclass(frozen=True)
class Score:
    """One response's score: ``correct`` in [0, 1]; ``extracted`` the answer read from it (None
    when none was found); ``detail`` why it failed when that is worth counting (``timeout``,
    ``memory``, ``no_answer``...)."""

    correct: float
    extracted: str | None = None
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A benchmark: its splits, a loader and a scorer.

    ``load(path, split, skips)`` returns the items of one split (bad rows skipped and counted
    in ``skips`` with a reason, never fatal one by one); ``score(item, response)`` scores one
    response (never raises on any response text)."""

    name: str
    splits: tuple[str, ...]
    default_split: str
    load: Callable[[str, str, SkipCounter], list[dict]]
    score: Callable[[dict, str], Score]
    description: str = ""


REGISTRY: dict[str, Benchmark] = {}


def register(b: Benchmark) -> Benchmark:
    if b.name in REGISTRY:
        raise ValueError(f"benchmark {b.name!r} registered twice")
    if b.default_split not in b.splits:
        raise ValueError(f"benchmark {b.name!r}: default split {b.default_split!r} not in {b.splits}")
    REGISTRY[b.name] = b
    return b


def item(
    *,
    id: str,
    question: str,
    answer: str,
    images: list | None = None,
    choices: list[str] | None = None,
    category: str = "",
    meta: dict[str, Any] | None = None,
    breakdown: dict[str, str] | None = None,
    root: str = "",
    where: str = "",
) -> dict:
    """An item record (see the module docstring)."""
    return {
        "id": id,
        "question": question,
        "answer": answer,
        "images": list(images or []),
        "choices": list(choices or []),
        "category": category,
        "meta": dict(meta or {}),
        "breakdown": dict(breakdown or {}),
        "_root": root,
        "_where": where,
    }
