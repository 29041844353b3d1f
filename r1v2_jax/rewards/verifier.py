"""Rule-based answer checking: extraction, math-verify equivalence, a bounded worker pool.

:func:`extract_answer` finds the answer in a completion (after the last ``</think>``): the
last ``\\boxed{...}`` (nested braces), else "the answer is ...", else the last line. For
multiple choice (gold is a letter and choices are given) :func:`extract_choice` finds the
letter by a written-down precedence (see there) and compares exactly. Everything else goes
through math-verify (numbers, fractions, LaTeX, units, intervals, sets). :class:`VerifierPool`
runs checks in warm worker processes with a per-answer time bound (:class:`VerifierConfig`):
an answer that hangs the parser costs at most ``timeout`` seconds, scores 0, and is counted;
the stuck worker is replaced while the others go on. Training, MPO pair mining and evaluation
all score through it.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import re
import time
import weakref
from typing import Any, Callable, Sequence

_ANSWER_IS = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|:)\s*[:\s]*(.+?)(?:\.\s*$|\n|$)", re.IGNORECASE | re.MULTILINE
)
_SCI = re.compile(r"[-+]?\d+(?:\.\d+)?[eE][-+]?\d+")
# LaTeX text wrappers whose content is what a model means: \text{B}, \mathrm{(C)}, \textbf{D}
_TEX_WRAP = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mathsf|operatorname|mbox)\s*\{([^{}]*)\}")
_FINAL_HEADING = re.compile(r"final\s+answer", re.IGNORECASE)
_ANSWER_PHRASE = re.compile(
    r"(?:(?:final answer|correct (?:answer|option|choice)|best (?:answer|option|choice)|the answer|answer"
    r"|my (?:answer|choice))\s*(?:is|:|would be|should be|will be)|i (?:choose|pick|select|go with))"
    r"\s*[:\s]*(.+)",
    re.IGNORECASE,
)
# A letter set off as an answer, anywhere: "(C)", "[C]", "**C**", "option C", "C." / "C)" / "C:"
# after a space or line start, or a letter alone on its line.
_STANDALONE = re.compile(
    r"\(([A-Z])\)|\[([A-Z])\]|\*\*\(?([A-Z])\)?\*\*|__([A-Z])__|(?i:option|choice)\s+\(?([A-Z])\b"
    r"|(?:^|(?<=\s))([A-Z])[.):](?=\s|$)|^[ \t]*([A-Z])[ \t]*$",
    re.MULTILINE,
)


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
    """ "B", "(B)", "[B]", "**B**", "B.", "B) text", "B: text", "Option B ..." -> "B"."""
    m = re.match(r"^(?:option|choice)?[\s\(\[\*_]*([A-Za-z])\s*[\)\]\*_]*(?:[.):,;]|\s|$)", text.strip(), re.IGNORECASE)
    if not m:
        return None
    x = m.group(1)
    rest = text.strip()[m.end() :].strip()
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


_BOXED_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"[{}]")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) whose braces close.

    One pass over the text with a stack of open braces (linear: a completion of thousands of
    unclosed ``\\boxed{`` used to cost one scan to the end per opening)."""
    opens = {m.end() - 1 for m in _BOXED_OPEN.finditer(text)}
    if not opens:
        return None
    stack: list[int] = []
    best: tuple[int, int] | None = None  # (start, end) of the closed box that opens last
    for m in _BRACE.finditer(text):
        i = m.start()
        if m.group() == "{":
            stack.append(i)
        elif stack:
            start = stack.pop()
            if start in opens and (best is None or start > best[0]):
                best = (start, i)
    return None if best is None else text[best[0] + 1 : best[1]].strip()


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
        text = text[heads[-1].start() :]
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
    for cand in [plain, lines[-1]] if lines else []:
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
    # math-verify (and sympy under it) take seconds to import: only where an answer needs it
    from math_verify import parse, verify  # noqa: PLC0415

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


def _warm_up():
    """What a worker does before it takes answers: import math-verify (and sympy) and run it once."""
    check("\\boxed{\\frac{1}{2}}", "0.5")


def _worker_loop(conn, fn: Callable, warm_up: Callable | None) -> None:
    """A verifier worker: warm up, say so, then answer ``(index, args)`` requests until ``None``."""
    try:
        if warm_up is not None:
            warm_up()
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("failed", None, f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None, None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        i, args = msg
        try:
            conn.send(("done", i, float(fn(args))))
        except Exception as e:  # noqa: BLE001 - one answer's failure scores 0 in the parent
            conn.send(("error", i, f"{type(e).__name__}: {e}"))


@dataclasses.dataclass(frozen=True)
class VerifierConfig:
    """How rule rewards are checked in training and evaluation (:class:`VerifierPool`)."""

    timeout: float = 5.0  # seconds one answer may take, counted from when a warm worker starts on it
    num_workers: int = 2  # worker processes (each holds math-verify and sympy)
    startup_timeout: float = 300.0  # seconds to wait for a worker to start; never charged to an answer

    def __post_init__(self):
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"verifier.timeout: must be a finite number of seconds > 0, got {self.timeout!r}")
        if int(self.num_workers) != self.num_workers or self.num_workers < 1:
            raise ValueError(f"verifier.num_workers: must be an integer >= 1, got {self.num_workers!r}")
        if not (math.isfinite(self.startup_timeout) and self.startup_timeout > 0):
            raise ValueError(
                f"verifier.startup_timeout: must be a finite number of seconds > 0, got {self.startup_timeout!r}"
            )


@dataclasses.dataclass
class _Worker:
    process: Any
    conn: Any
    started: float
    ready: bool = False
    item: int | None = None  # the answer it is checking
    deadline: float = 0.0


def _kill_all(workers: list[_Worker]) -> None:
    for w in workers:
        w.process.kill()
        w.process.join(5)
        w.conn.close()
    workers.clear()


class VerifierPool:
    """Checks answers in worker processes; no answer costs more than ``timeout`` seconds.

    ``score(items)`` takes ``(completion, gold, choices)`` triples and returns rewards (1/0)
    in order. The bound is enforced from outside: an answer is handed to a worker that is
    already warm (math-verify imported and run once) and idle, its clock starts then, and a
    worker past its deadline is killed; that answer scores 0 and ``errors["timeout"]`` counts
    it, an exception inside the checker counts as ``error`` and a worker that dies as
    ``crashed``. A killed worker is replaced at once and the other workers go on with the
    batch; answers wait (uncharged) for a warm worker, so a cold pool or one replacing a
    worker does not score correct answers 0. Workers start when the pool is made (they warm
    while the model compiles) and are spawned, never forked from a process holding JAX.
    No worker becoming ready within ``startup_timeout`` (or one failing to warm up, e.g.
    math-verify missing) is a RuntimeError: silently scoring everything 0 would be worse.
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout: float = 5.0,
        fn: Callable = _worker_check,
        *,
        startup_timeout: float = 300.0,
        warm_up: Callable | None = _warm_up,
        start: bool = True,
    ):
        self.cfg = VerifierConfig(timeout=timeout, num_workers=num_workers, startup_timeout=startup_timeout)
        self.fn, self.warm_up = fn, warm_up
        self.errors: collections.Counter = collections.Counter()
        self._ctx = mp.get_context("spawn")  # never fork a process that holds JAX threads
        self._workers: list[_Worker] = []
        # the workers end with the pool (or with this process: they are daemons)
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)
        if start:
            self.start()

    @classmethod
    def from_config(cls, cfg: VerifierConfig, **kw) -> VerifierPool:
        return cls(cfg.num_workers, cfg.timeout, startup_timeout=cfg.startup_timeout, **kw)

    @property
    def timeout(self) -> float:
        return self.cfg.timeout

    def start(self) -> None:
        """Start the missing workers (returns at once; they warm up in the background)."""
        while len(self._workers) < self.cfg.num_workers:
            parent, child = self._ctx.Pipe()
            proc = self._ctx.Process(
                target=_worker_loop, args=(child, self.fn, self.warm_up), daemon=True, name="r1v2-verifier"
            )
            proc.start()
            child.close()
            self._workers.append(_Worker(proc, parent, time.monotonic()))

    def _kill(self, w: _Worker) -> None:
        w.process.kill()
        w.process.join(5)
        w.conn.close()
        self._workers.remove(w)

    def score(self, items: Sequence[tuple[str, str, Sequence[str]]]) -> list[float]:
        inner = max(1, math.ceil(self.cfg.timeout))  # math-verify's own (cooperative) limit, whole seconds
        todo = collections.deque(range(len(items)))
        out = [0.0] * len(items)
        self.start()
        while todo or any(w.item is not None for w in self._workers):
            for w in self._workers:  # hand answers to warm, idle workers: each one's clock starts now
                if w.ready and w.item is None and todo:
                    i = todo.popleft()
                    c, g, ch = items[i]
                    w.conn.send((i, (c, g, list(ch), inner)))
                    w.item, w.deadline = i, time.monotonic() + self.cfg.timeout
            self._poll(out)
            self.start()  # a killed or crashed worker is replaced at once
        return out

    def _poll(self, out: list[float]) -> None:
        """Wait for the next message or deadline; record results; kill workers past their deadline."""
        now = time.monotonic()
        waits = [w.deadline - now for w in self._workers if w.item is not None]
        if not any(w.ready for w in self._workers):
            oldest = min(w.started for w in self._workers)
            if now - oldest > self.cfg.startup_timeout:
                self.close()
                raise RuntimeError(
                    f"verifier pool: no worker ready after {self.cfg.startup_timeout:g} s (verifier.startup_timeout)"
                )
            waits.append(oldest + self.cfg.startup_timeout - now)
        by_conn = {id(w.conn): w for w in self._workers}
        for conn in mp_connection.wait([w.conn for w in self._workers], timeout=max(0.0, min(waits))):
            w = by_conn[id(conn)]
            try:
                kind, i, value = conn.recv()
            except (EOFError, OSError):  # the worker died
                self._kill(w)
                code = w.process.exitcode
                if not w.ready:
                    self.close()
                    raise RuntimeError(f"verifier pool: a worker exited while starting (exit code {code})") from None
                if w.item is not None:
                    self.errors["crashed"] += 1
                    out[w.item] = 0.0
                continue
            if kind == "ready":
                w.ready = True
            elif kind == "failed":
                self.close()
                raise RuntimeError(f"verifier pool: a worker could not start: {value}")
            else:
                if kind == "error":
                    self.errors["error"] += 1
                out[i] = value if kind == "done" else 0.0
                w.item = None
        now = time.monotonic()
        for w in [w for w in self._workers if w.item is not None and now >= w.deadline]:
            self.errors["timeout"] += 1
            out[w.item] = 0.0
            self._kill(w)

    def close(self) -> None:
        for w in list(self._workers):
            if w.ready and w.item is None:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
            self._kill(w)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
