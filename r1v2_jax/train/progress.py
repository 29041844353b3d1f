"""Progress of a stage loop wherever it runs: a tqdm bar on a terminal; elsewhere (CI logs,
``nohup``, a pod's log stream) one line every ``every_s`` seconds and at the end, on process 0:
``[grpo] step 12/200 (6%) loss 0.123 accuracy 0.5 | 3.1 s/step, ETA 9m43s``."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

SHOWN = ("loss", "accuracy", "reward_total", "grad_norm")


def _eta(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    def __init__(self, stage: str, total: int, initial: int, every_s: float = 30.0, enabled: bool = True, stream=None):
        self.stage, self.total, self.start, self.every_s = stage, total, initial, every_s
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.bar = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=stage, leave=False, dynamic_ncols=True, file=self.stream)
        self.t0 = self.last = time.perf_counter()

    def update(self, step: int, row: dict) -> None:
        shown = {k: float(row[k]) for k in SHOWN if k in row}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})
            return
        now = time.perf_counter()
        if not self.enabled or (now - self.last < self.every_s and step < self.total):
            return
        self.last = now
        done = max(step - self.start, 1)
        per = (now - self.t0) / done
        metrics = " ".join(f"{k} {v:.3g}" for k, v in shown.items())
        print(
            f"[{self.stage}] step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%) {metrics} | "
            f"{per:.2f} s/step, ETA {_eta(per * (self.total - step))}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
