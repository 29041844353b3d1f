"""Run outputs: a JSONL metrics log, TensorBoard event files, and PNG plots at the end."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

log = logging.getLogger("r1v2_jax.train")


def read_jsonl(path: str) -> tuple[list[str], list[dict], bool]:
    """The lines and parsed rows of a JSONL log, and whether its last line was a partial one
    (no newline and not valid JSON: a write cut short by a kill), which is left out. Any other
    line that is not a JSON object is an error naming the file and line."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    rows, partial = [], False
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines) - 1 and not line.endswith("\n"):
                partial = True
                lines = lines[:-1]
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON row ({e}); fix or remove that line to resume") from None
        rows.append(row)
    return lines, rows, partial


def rewrite_atomically(path: str, lines: list[str]) -> None:
    """Replace ``path`` by ``lines`` through a temporary file and a rename: a kill at any moment
    leaves the old or the new file, never a cut one."""
    tmp = f"{path}.rewrite-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def repair_jsonl(path: str) -> bool:
    """Drop a partial last line (see :func:`read_jsonl`) and end the file with a newline, so
    appending continues cleanly. Returns whether anything was changed."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return False
    lines, _, partial = read_jsonl(path)
    if partial:
        log.warning("%s: dropped a partial last line (a write cut short by a kill)", path)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    rewrite_atomically(path, lines)
    return True


def _plain(v: Any):
    if hasattr(v, "item") and np.ndim(v) == 0:
        return v.item()
    if isinstance(v, (np.ndarray,)) or hasattr(v, "shape"):
        return np.asarray(v).tolist()
    return v


class MetricsLog:
    """Appends one JSON row per step to ``metrics.jsonl`` (flushed each row) and mirrors scalars
    to TensorBoard from process 0. ``truncate(step)`` drops rows after a checkpoint's step so
    a resumed run's log equals an uninterrupted one; it rewrites the file atomically. A partial
    last line left by a kill is dropped when the log is opened."""

    def __init__(self, run_dir: str, tensorboard: bool = True, is_main: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.is_main = is_main
        os.makedirs(run_dir, exist_ok=True)
        if is_main:
            repair_jsonl(self.path)
        self._tb = None
        if tensorboard and is_main:
            try:
                from tensorboardX import SummaryWriter  # noqa: PLC0415 (heavy; only with TensorBoard logging on)

                self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except ImportError:  # optional
                self._tb = None

    def truncate(self, step: int, stage: str) -> None:
        """Drop rows of ``stage`` with a step after ``step`` (other stages' rows stay)."""
        if not self.is_main or not os.path.exists(self.path):
            return
        lines, rows, partial = read_jsonl(self.path)
        keep = [
            ln if ln.endswith("\n") else ln + "\n"
            for ln, r in zip(lines, rows)
            if r.get("stage") != stage or r["step"] <= step
        ]
        if len(keep) != len(lines) or partial:
            rewrite_atomically(self.path, keep)

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
        return read_jsonl(self.path)[1]

    def close(self):
        if self._tb is not None:
            self._tb.close()


def plot_curves(
    rows: list[dict],
    out_path: str,
    keys=(
        "loss",
        "reward_total",
        "accuracy",
        "effective_share_before",
        "effective_share_after",
        "response_length",
        "kl",
    ),
) -> str | None:
    """PNG of the main curves, one panel per key present, x = global row index per stage."""
    try:
        import matplotlib  # noqa: PLC0415 (heavy; only when a plot is drawn)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
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
