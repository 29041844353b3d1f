"""Rule-based answer checking: extraction, math-verify equivalence, a bounded worker pool.

:func:`extract_answer` finds the answer in a completion (after the last ``</think>``): the
last ``\\boxed{...}`` (nested braces), else "the answer is ...", else the last line. For
multiple choice (gold is a letter and choices are given) :func:`extract_choice` finds the
letter (``\\boxed{B}``, "(B)", "B.", "Answer: B", or the text of a choice) and compares
exactly. Everything else goes through math-verify (numbers, fractions, LaTeX, units,
intervals, sets). :class:`VerifierPool` runs checks in worker processes with a per-answer
time bound: an answer that hangs the parser costs at most ``timeout`` seconds, scores 0,
and is counted; the stuck worker is replaced.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import re
from typing import Callable, Sequence

_ANSWER_IS = re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:)\s*[:\s]*(.+?)(?:\.\s*$|\n|$)",
                        re.IGNORECASE | re.MULTILINE)
_SCI = re.compile(r"[-+]?\d+(?:\.\d+)?[eE][-+]?\d+")
_CHOICE_PATTERNS = [
    re.compile(r"\\boxed\{\s*\(?([A-Z])\)?\s*\}"),
    re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*\(?\**([A-Z])\b\)?", re.IGNORECASE),
    re.compile(r"\(([A-Z])\)"),
    re.compile(r"(?:^|\s)([A-Z])[.)](?:\s|$)"),
    re.compile(r"^\s*([A-Z])\s*$", re.MULTILINE),
]


def after_thinking(text: str) -> str:
    """The part of a completion after the last ``</think>`` (all of it if there is none);
    chat end tokens removed."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    for t in ("<|im_end|>", "<|endoftext|>"):
        text = text.replace(t, "")
    return text.strip()


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start:i - 1].strip()
    return None


def extract_answer(completion: str) -> str:
    text = after_thinking(completion)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    found = _ANSWER_IS.findall(text)
    if found:
        return found[-1].strip().rstrip(".").strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def extract_choice(completion: str, choices: Sequence[str] = ()) -> str | None:
    """The chosen letter, or None."""
    text = after_thinking(completion)
    n = len(choices) if choices else 26
    letters = {chr(65 + i) for i in range(n)}
    for pat in _CHOICE_PATTERNS:
        found = [x.upper() for x in pat.findall(text) if x.upper() in letters]
        if found:
            return found[-1]
    low = text.lower().rstrip(". ")
    for i, c in enumerate(choices):  # the choice's text itself
        if c and (low == c.lower() or low.endswith(c.lower())):
            return chr(65 + i)
    return None


def is_choice_question(gold: str, choices: Sequence[str]) -> bool:
    return bool(choices) and len(gold.strip()) == 1 and gold.strip().upper().isalpha()


def check(completion: str, gold: str, choices: Sequence[str] = (), timeout: int = 5) -> float:
    """1.0 if the completion's answer equals ``gold``, else 0.0 (in-process; see VerifierPool)."""
    if is_choice_question(gold, choices):
        return float(extract_choice(completion, choices) == gold.strip().upper())
    pred = extract_answer(completion)
    if not pred:
        return 0.0
    if _SCI.fullmatch(pred.strip()):  # 1e3 means 1000, not 1·e·3 as LaTeX would read it
        pred = repr(float(pred.strip()))
    if pred.strip() == gold.strip():
        return 1.0
    from math_verify import parse, verify

    g = parse(f"${gold}$", parsing_timeout=timeout)
    if not g:
        g = parse(gold, parsing_timeout=timeout)
    p = parse(f"${pred}$", parsing_timeout=timeout)
    if not p:
        p = parse(pred, parsing_timeout=timeout)
    if not g or not p:
        return 0.0
    return float(verify(g, p, timeout_seconds=timeout))


def _worker_check(args):
    completion, gold, choices, timeout = args
    return check(completion, gold, choices, timeout)


class VerifierPool:
    """Checks answers in worker processes with a hard per-answer time bound.

    ``score(items)`` takes ``(completion, gold, choices)`` triples and returns rewards (1/0)
    in order; ``errors`` counts ``timeout`` and ``error`` outcomes (each scored 0). A worker
    stuck past the bound is killed with its pool and a fresh pool is started.
    """

    def __init__(self, num_workers: int = 2, timeout: float = 5.0, fn: Callable = _worker_check):
        self.num_workers, self.timeout, self.fn = num_workers, timeout, fn
        self.errors: collections.Counter = collections.Counter()
        self._ctx = mp.get_context("spawn")  # never fork a process that holds JAX threads
        self._pool = None

    def _ensure(self):
        if self._pool is None:
            self._pool = self._ctx.Pool(self.num_workers)

    def score(self, items: Sequence[tuple[str, str, Sequence[str]]]) -> list[float]:
        self._ensure()
        inner = max(1, int(self.timeout))
        pending = [self._pool.apply_async(self.fn, ((c, g, list(ch), inner),)) for c, g, ch in items]
        out, poisoned = [], False
        for res in pending:
            try:
                # Each answer gets its own bound, counted from when we start waiting for it
                # (so a batch of N costs at most N x timeout even if workers hang).
                out.append(float(res.get(timeout=self.timeout)))
            except mp.TimeoutError:
                self.errors["timeout"] += 1
                out.append(0.0)
                poisoned = True
            except Exception:  # noqa: BLE001 - a verifier failure must never stop training
                self.errors["error"] += 1
                out.append(0.0)
        if poisoned:  # a worker may be stuck: replace the pool
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        return out

    def close(self):
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
