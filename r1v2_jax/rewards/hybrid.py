"""The hybrid reward ``r = w_rule·r_rule + w_rm·r_RM + w_format·r_format`` (weights 1, 1, 1 as
in the paper), with an optional gate: the verifier's reward only counts when the format is right."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class HybridConfig:
    w_rule: float = 1.0
    w_rm: float = 1.0
    w_format: float = 1.0
    gate_rule_on_format: bool = False


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
        rm = np.asarray(rm, np.float32)
        total = total + cfg.w_rm * rm
        metrics["reward_rm"] = float(rm.mean())
        metrics["weight_rm"] = cfg.w_rm
    metrics["reward_total"] = float(total.mean())
    return total.astype(np.float32), metrics
