"""Rule-based answer checking: extraction, math-verify equivalence, a bounded worker pool.

:func:`extract_answer` finds the answer in a completion (after the last ``</think>``): the
last ``\\boxed{...}`` (nested braces), else "the answer is ...", else the last line. For
multiple choice (gold is a letter and choices are given) :func:`extract_choice` finds the
letter by a written-down precedence (see there) and compares exactly. Everything else goes
through math-verify (numbers, fractions, LaTeX, units, intervals, sets). :class:`VerifierPool`
runs checks in worker processes with a per-answer time bound: an answer that hangs the parser costs at most ``timeout`` seconds, scores 0,
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
# LaTeX text wrappers whose content is what a model means: \text{B}, \mathrm{(C)}, \textbf{D}
_TEX_WRAP = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mathsf|operatorname|mbox)\s*\{([^{}]*)\}")
_FINAL_HEADING = re.compile(r"final\s+answer", re.IGNORECASE)
_ANSWER_PHRASE = re.compile(
    r"(?:(?:final answer|correct (?:answer|option|choice)|best (?:answer|option|choice)|the answer|answer"
    r"|my (?:answer|choice))\s*(?:is|:|would be|should be|will be)|i (?:choose|pick|select|go with))"
    r"\s*[:\s]*(.+)", re.IGNORECASE)
# A letter set off as an answer, anywhere: "(C)", "[C]", "**C**", "option C", "C." / "C)" / "C:"
# after a space or line start, or a letter alone on its line.
_STANDALONE = re.compile(
    r"\(([A-Z])\)|\[([A-Z])\]|\*\*\(?([A-Z])\)?\*\*|__([A-Z])__|(?i:option|choice)\s+\(?([A-Z])\b"
    r"|(?:^|(?<=\s))([A-Z])[.):](?=\s|$)|^[ \t]*([A-Z])[ \t]*$", re.MULTILINE)


def _untex(text: str) -> str:
    """Unwrap \\text{...}-like wrappers (nested ones too) and LaTeX spaces; strip $ and \\( \\)."""
    prev = None
    while prev != text:
        prev, text = text, _TEX_WRAP.sub(r"\1", text)
    for a in ("\\(", "\\)", "\\[", "\\]", "$", "\\ ", "~", "\\quad", "\\,"):
        text = text.replace(a, " ")
    return text.strip()


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _letter_at_start(text: str, letters: set[str]) -> str | None:
    """"B", "(B)", "[B]", "**B**", "B.", "B) text", "B: text", "Option B ..." -> "B"."""
    m = re.match(r"^(?:option|choice)?[\s\(\[\*_]*([A-Za-z])\s*[\)\]\*_]*(?:[.):,;]|\s|$)", text.strip(),
                 re.IGNORECASE)
    if not m:
        return None
    x = m.group(1)
    rest = text.strip()[m.end():].strip()
    # a lone lower-case letter counts ("\boxed{b}"); one followed by more words is a word ("a red circle")
    if x.islower() and rest:
        return None
    return x.upper() if x.upper() in letters else None


def _choice_in(text: str, choices: Sequence[str]) -> str | None:
    """The choice whose text ``text`` holds (earliest in it; longest on a tie)."""
    low, best = " " + _norm(text) + " ", None
    for i, c in enumerate(choices):
        c_n = _norm(c)
        pos = low.find(" " + c_n + " ") if c_n else -1
        if pos >= 0 and (best is None or (pos, -len(c_n)) < best[0]):
            best = ((pos, -len(c_n)), chr(65 + i))
    return None if best is None else best[1]


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
    """The chosen letter (among the first ``len(choices)``, or A–Z without choices), or None.

    Precedence, each step deciding only when the one before it found nothing to read:

    1. **Region**: the text after the last ``</think>``, and within it the part from the last
       "final answer" on, when there is one.
    2. **The last box** ``\\boxed{...}`` in the region decides when present: its content with
       ``\\text{}``/``\\mathrm{}``/``\\textbf{}``-like wrappers unwrapped is read as a letter at its
       start ("B", "(B)", "B. the blue square", "Option B") or else as a choice's text; a box
       holding neither gives None (an earlier letter in the prose is not the boxed answer).
    3. **"The answer is ..."** (also "Answer:", "Final answer:", "the correct option is",
       "I choose"): the rest of the phrase's line, read as in 2, or failing that its first
       set-off letter (as in 4); the last phrase whose line gives a letter decides.
    4. **The last set-off letter** in the region: "(C)", "[C]", "**C**", "option C", "C." /
       "C)" / "C:" after a space or at a line start, or a letter alone on a line. The *last* one
       wins, so "Option A is wrong ... (C)" reads C. Bare capitals inside a sentence ("I", "A
       red circle") are not letters.
    5. **A choice's text**: the region, or its last line, is (or ends with) a choice's text.

    The spirit of MMMU's ``parse_multi_choice_response`` and MathVista's answer extraction
    (letters in brackets or with a period, the last occurrence winning, then the option text),
    ordered by how explicitly the model marks its answer.
    """
    text = after_thinking(completion)
    heads = list(_FINAL_HEADING.finditer(text))
    if heads:
        text = text[heads[-1].start():]
    n = len(choices) if choices else 26
    letters = {chr(65 + i) for i in range(n)}
    boxed = last_boxed(text)
    if boxed is not None:
        inner = _untex(boxed)
        return _letter_at_start(inner, letters) or (_choice_in(inner, choices) if inner else None)
    phrases = list(_ANSWER_PHRASE.finditer(text))
    for ph in reversed(phrases):
        tail = _untex(ph.group(1).split("\n")[0])
        got = _letter_at_start(tail, letters) or _choice_in(tail, choices)
        if got is None:
            got = next((x for m in _STANDALONE.finditer(tail) for x in m.groups() if x and x in letters), None)
        if got is not None:
            return got
    plain = _untex(text)
    found = [x for m in _STANDALONE.finditer(plain) for x in m.groups() if x and x in letters]
    if found:
        return found[-1]
    lines = [ln for ln in plain.splitlines() if ln.strip()]
    for cand in ([plain, lines[-1]] if lines else []):
        low = _norm(cand)
        for i, c in enumerate(choices):
            if c and (low == _norm(c) or low.endswith(" " + _norm(c))):
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
