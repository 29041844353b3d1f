"""The hybrid reward ``r = w_rule·r_rule + w_rm·f(r_RM) + w_format·r_format`` (weights 1, 1, 1 as
in the paper), with an optional gate: the verifier's reward only counts when the format is right.

``rm_transform`` is ``f``: ``none`` (the raw score, as the paper sums Skywork-VL-Reward's
uncalibrated scores, about -15 to +7.5) or ``sigmoid`` (``σ(score)``: a Bradley–Terry score as
the probability of beating a score-0 response, in [0, 1]). Bounded, the reward model's term
cannot outweigh the verifier's: with ``w_rm < w_rule`` a wrong answer the reward model loves
totals less than a right one it hates (with ``w_rm = w_rule``, never more), so a policy cannot
gain by pleasing the reward model against the verifier; the reward model ranks the answers the
verifier scores alike (all right, or all wrong, in a group)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class HybridConfig:
    w_rule: float = 1.0
    w_rm: float = 1.0
    w_format: float = 1.0
    gate_rule_on_format: bool = False
    rm_transform: str = "none"

    def __post_init__(self):
        if self.rm_transform not in RM_TRANSFORMS:
            raise ValueError(f"rm_transform: expected one of {', '.join(RM_TRANSFORMS)}, got {self.rm_transform!r}")


RM_TRANSFORMS = ("none", "sigmoid")


def rm_term(rm: np.ndarray, transform: str) -> np.ndarray:
    """The reward model's score as it enters the total (before ``w_rm``)."""
    rm = np.asarray(rm, np.float32)
    if transform == "sigmoid":
        with np.errstate(over="ignore"):  # exp overflow of a very negative score: 0, as it should
            return (1.0 / (1.0 + np.exp(-rm.astype(np.float64)))).astype(np.float32)
    return rm


def rm_metrics(rm: np.ndarray, term: np.ndarray, cfg: HybridConfig) -> dict:
    """``reward_rm``: the mean raw score; with a transform, ``reward_rm_term``: the mean of what
    entered the total (before ``w_rm``)."""
    out = {"reward_rm": float(rm.mean())}
    if cfg.rm_transform != "none":
        out["reward_rm_term"] = float(term.mean())
    return out


def combine(rule: np.ndarray, fmt: np.ndarray, rm: np.ndarray | None, cfg: HybridConfig = HybridConfig()):
    """Per-sample totals f32[N] and per-component metrics. ``rm`` None: no reward model."""
    rule = np.asarray(rule, np.float32)
    fmt = np.asarray(fmt, np.float32)
    gated = rule * (fmt > 0) if cfg.gate_rule_on_format else rule
    total = cfg.w_rule * gated + cfg.w_format * fmt
    metrics = {
        "reward_rule": float(rule.mean()),
        "reward_format": float(fmt.mean()),
        "accuracy": float((rule > 0).mean()),
        "reward_rule_gated": float(gated.mean()),
        "weight_rule": cfg.w_rule,
        "weight_format": cfg.w_format,
    }
    if rm is not None:
        term = rm_term(rm, cfg.rm_transform)
        total = total + cfg.w_rm * term
        metrics.update(rm_metrics(np.asarray(rm, np.float32), term, cfg))
        metrics["weight_rm"] = cfg.w_rm
    metrics["reward_total"] = float(total.mean())
    return total.astype(np.float32), metrics
