"""Run outputs: a JSONL metrics log, TensorBoard event files, and PNG plots at the end."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def _plain(v: Any):
    if hasattr(v, "item") and np.ndim(v) == 0:
        return v.item()
    if isinstance(v, (np.ndarray,)) or hasattr(v, "shape"):
        return np.asarray(v).tolist()
    return v


class MetricsLog:
    """Appends one JSON row per step to ``metrics.jsonl`` (flushed each row) and mirrors scalars
    to TensorBoard from process 0. ``truncate(step)`` drops rows after a checkpoint's step so
    a resumed run's log equals an uninterrupted one."""

    def __init__(self, run_dir: str, tensorboard: bool = True, is_main: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.is_main = is_main
        os.makedirs(run_dir, exist_ok=True)
        self._tb = None
        if tensorboard and is_main:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except ImportError:  # optional
                self._tb = None

    def truncate(self, step: int, stage: str) -> None:
        """Drop rows of ``stage`` with a step after ``step`` (other stages' rows stay)."""
        if not self.is_main or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [ln for ln in f if json.loads(ln).get("stage") != stage or json.loads(ln)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(keep)

    def write(self, row: dict) -> None:
        if not self.is_main:
            return
        row = {k: _plain(v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
        if self._tb is not None:
            tag = row.get("stage", "train")
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"{tag}/{k}", v, row["step"])

    def find(self, stage: str) -> dict | None:
        """The last row of ``stage``, if any (used to skip work a resumed run already did)."""
        found = [r for r in self.rows() if r.get("stage") == stage]
        return found[-1] if found else None

    def rows(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f]

    def close(self):
        if self._tb is not None:
            self._tb.close()


def plot_curves(rows: list[dict], out_path: str, keys=("loss", "reward_total", "accuracy", "effective_share_before",
                                                        "effective_share_after", "response_length", "kl")) -> str | None:
    """PNG of the main curves, one panel per key present, x = global row index per stage."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    present = [k for k in keys if any(k in r for r in rows)]
    if not present:
        return None
    fig, axes = plt.subplots(len(present), 1, figsize=(8, 2.2 * len(present)), squeeze=False)
    for ax, k in zip(axes[:, 0], present):
        for stage in dict.fromkeys(r.get("stage", "") for r in rows):
            pts = [(i, r[k]) for i, r in enumerate(rows) if r.get("stage", "") == stage and k in r]
            if pts:
                ax.plot(*zip(*pts), label=stage)
        ax.set_ylabel(k, fontsize=8)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("logged step (all stages)")
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path
