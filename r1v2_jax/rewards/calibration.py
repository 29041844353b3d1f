"""Reward-threshold calibration: MPO pair construction, a threshold report, and the
hallucination monitor that watches for reward hacking during training.

The R1V2 paper's warning: with too low a reward threshold MPO/GRPO learn to please the
reward model and hallucinate (threshold 10 peaked at 750 iterations, then fell as
hallucination rose). Here a threshold is chosen with evidence (:func:`threshold_report`)
and watched while training (:class:`HallucinationMonitor`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger("r1v2_jax.rewards")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One sampled response to a prompt: its reward-model score and the verifier's verdict."""

    text: str
    score: float
    correct: float | None = None  # None when the prompt has no verifiable answer


def build_pairs(
    groups: Sequence[Sequence[Candidate]], threshold: float, mode: str = "absolute", max_pairs_per_prompt: int = 1
) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) index triples.

    ``absolute``: chosen have score >= threshold, rejected < threshold; the best chosen are
    paired with the worst rejected. ``gap``: any two candidates whose scores differ by at
    least ``threshold``, largest gaps first. At most ``max_pairs_per_prompt`` pairs a prompt,
    no candidate used twice.
    """
    if mode not in ("absolute", "gap"):
        raise ValueError(f"pair mode: expected 'absolute' or 'gap', got {mode!r}")
    out = []
    for p, cands in enumerate(groups):
        s = np.asarray([c.score for c in cands], np.float64)
        pairs = []
        if mode == "absolute":
            hi = [i for i in np.argsort(-s, kind="stable") if s[i] >= threshold]
            lo = [i for i in np.argsort(s, kind="stable") if s[i] < threshold]
            pairs = list(zip(hi, lo))
        else:
            cand = sorted(
                ((s[i] - s[j], i, j) for i in range(len(s)) for j in range(len(s)) if s[i] - s[j] >= threshold),
                key=lambda t: (-t[0], t[1], t[2]),
            )
            used: set[int] = set()
            for _, i, j in cand:
                if i not in used and j not in used:
                    pairs.append((i, j))
                    used |= {i, j}
        out += [(p, int(i), int(j)) for i, j in pairs[:max_pairs_per_prompt]]
    return out


def threshold_report(
    groups: Sequence[Sequence[Candidate]],
    thresholds: Sequence[float],
    mode: str = "absolute",
    max_pairs_per_prompt: int = 1,
) -> list[dict]:
    """For each candidate threshold: the number of pairs and how often the verifier agrees
    with the preference (chosen correct and rejected wrong), disagrees, or cannot tell."""
    rows = []
    for t in thresholds:
        pairs = build_pairs(groups, t, mode, max_pairs_per_prompt)
        agree = disagree = ties = 0
        for p, c, r in pairs:
            vc, vr = groups[p][c].correct, groups[p][r].correct
            if vc is None or vr is None or vc == vr:
                ties += 1
            elif vc > vr:
                agree += 1
            else:
                disagree += 1
        decided = agree + disagree
        rows.append(
            {
                "threshold": t,
                "pairs": len(pairs),
                "agree": agree,
                "disagree": disagree,
                "undecided": ties,
                "agreement": agree / decided if decided else float("nan"),
            }
        )
    return rows


def format_report(rows: list[dict]) -> str:
    lines = [
        f"{'threshold':>9} | {'pairs':>6} | {'agreement':>9} | {'agree':>5} | {'disagree':>8} | {'undecided':>9}",
        "-" * 62,
    ]
    for r in rows:
        lines.append(
            f"{r['threshold']:9.3g} | {r['pairs']:6d} | {r['agreement']:9.1%} | {r['agree']:5d} | "
            f"{r['disagree']:8d} | {r['undecided']:9d}"
        )
    return "\n".join(lines)


# --- hallucination monitor ------------------------------------------------------------------

_COUNT_CLAIM = re.compile(
    r"\b(\d+|no|zero|one|two|three|four|five|six|seven|eight|nine|ten)\s+"
    r"(red|green|blue|yellow)\s+(circle|square|triangle)s?\b",
    re.IGNORECASE,
)
_WORDS = {
    "no": 0,
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
}


def contradicts_facts(answer: str, facts: Sequence[dict]) -> bool:
    """Whether an answer states a count of shapes that the image's facts contradict
    (the synthetic task's ``count`` facts; shapes absent from the facts count 0).

    Only count claims are checked ("3 red circles", "no blue squares"); answers about images
    without count facts never contradict.
    """
    counts = {(f["color"], f["shape"]): int(f["count"]) for f in facts if f.get("kind") == "count"}
    if not counts:
        return False
    for num, color, shape in _COUNT_CLAIM.findall(answer):
        n = int(num) if num.isdigit() else _WORDS[num.lower()]
        if counts.get((color.lower(), shape.lower()), 0) != n:
            return True
    return False


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    max_contradiction_rate: float = 0.15  # share of probe answers contradicting the image
    max_rm_high_on_wrong: float = 0.3  # share of verifier-wrong answers the RM scores above rm_high
    rm_high: float = 0.0
    action: str = "raise_threshold"  # or "stop"
    threshold_step: float = 1.0
    patience: int = 1  # consecutive bad evaluations before acting

    def __post_init__(self):
        if self.action not in ("raise_threshold", "stop"):
            raise ValueError(f"monitor action: expected 'raise_threshold' or 'stop', got {self.action!r}")


@dataclasses.dataclass
class Decision:
    step: int
    action: str  # "continue", "raise_threshold" or "stop"
    contradiction_rate: float
    rm_high_on_wrong: float
    threshold: float
    reason: str = ""


class HallucinationMonitor:
    """Evaluates probe answers during training and decides whether to act.

    ``evaluate(step, answers, facts, correct, rm_scores)`` measures the contradiction rate
    (answers stating facts the image contradicts) and the rate at which the reward model
    scores verifier-wrong answers above ``rm_high``. When either exceeds its bound for
    ``patience`` evaluations in a row, it raises the reward threshold by ``threshold_step``
    or asks to stop, and logs why. ``history`` keeps every decision.
    """

    def __init__(
        self,
        cfg: MonitorConfig,
        threshold: float,
        contradicts: Callable[[str, Sequence[dict]], bool] = contradicts_facts,
    ):
        self.cfg, self.threshold, self.contradicts = cfg, threshold, contradicts
        self.history: list[Decision] = []
        self._bad_streak = 0

    def evaluate(
        self,
        step: int,
        answers: Sequence[str],
        facts: Sequence[Sequence[dict]],
        correct: Sequence[float] | None = None,
        rm_scores: Sequence[float] | None = None,
    ) -> Decision:
        c = self.cfg
        contra = float(np.mean([self.contradicts(a, f) for a, f in zip(answers, facts)])) if answers else 0.0
        rm_wrong = 0.0
        if correct is not None and rm_scores is not None:
            wrong = np.asarray(correct) <= 0
            if wrong.any():
                rm_wrong = float((np.asarray(rm_scores)[wrong] > c.rm_high).mean())
        return self.decide(step, contra, rm_wrong)

    def decide(self, step: int, contra: float, rm_wrong: float) -> Decision:
        """The decision on rates measured elsewhere (e.g. over all hosts' samples):
        ``contra`` the contradiction rate, ``rm_wrong`` the RM-high-on-wrong rate."""
        c = self.cfg
        reasons = []
        if contra > c.max_contradiction_rate:
            reasons.append(f"contradiction rate {contra:.1%} > {c.max_contradiction_rate:.1%}")
        if rm_wrong > c.max_rm_high_on_wrong:
            reasons.append(
                f"reward model scores {rm_wrong:.1%} of wrong answers above {c.rm_high:g} "
                f"(> {c.max_rm_high_on_wrong:.1%})"
            )
        self._bad_streak = self._bad_streak + 1 if reasons else 0
        action = "continue"
        if reasons and self._bad_streak >= c.patience:
            action = c.action
            if action == "raise_threshold":
                self.threshold += c.threshold_step
            self._bad_streak = 0
            log.warning(
                "hallucination monitor at step %d: %s -> %s (threshold now %g)",
                step,
                "; ".join(reasons),
                action,
                self.threshold,
            )
        d = Decision(step, action, contra, rm_wrong, self.threshold, "; ".join(reasons))
        self.history.append(d)
        return d
