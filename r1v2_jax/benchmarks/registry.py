"""The benchmarks by name: imports every benchmark module (each registers itself in
:data:`base.REGISTRY`), looks them up, and scores through them safely."""

from __future__ import annotations

import logging

from r1v2_jax.benchmarks import aime24, livecodebench, mathvision, mathvista, mmmu, olympiadbench  # noqa: F401
from r1v2_jax.benchmarks.base import REGISTRY, Benchmark, Score

log = logging.getLogger("r1v2_jax.benchmarks")


def get(name: str) -> Benchmark:
    """The registered benchmark called ``name``; a clear error listing the known ones."""
    if name not in REGISTRY:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def safe_score(bench: Benchmark, it: dict, response: str, label: str = "") -> Score:
    """``bench.score``, with a scorer bug on one response scored 0 (``scorer_error``) and logged."""
    try:
        return bench.score(it, response)
    except Exception as e:  # noqa: BLE001 - one response's failure never stops the scoring
        log.warning("%s: scoring %s failed: %s: %s", bench.name, label or it.get("id"), type(e).__name__, e)
        return Score(0.0, None, "scorer_error")


def score_by_name(name: str, it: dict, response: str, label: str = "") -> Score:
    """:func:`safe_score` with the registered benchmark ``name`` (what a worker process runs:
    importing the benchmarks does not import JAX)."""
    return safe_score(get(name), it, response, label)
