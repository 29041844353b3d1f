#!/usr/bin/env python3
"""The CPU demo (`r1v2 demo`) over several seeds: held-out pass@1 after each stage, per seed.

Each seed runs as its own process (`python -m r1v2_jax.cli demo --out OUT/seed{N}
--config.seed=N ...`), one after another; its wall time and CPU time (user + system of the
child, all threads) are measured. A seed whose run folder already holds a summary.json is
read back, not rerun (delete the folder to redo it). Prints a table and whether the recipe's
targets hold: GRPO above SFT on every seed, MPO not below SFT on average.

    python bench/demo_seeds.py [--seeds 0,1,2,3,4] [--out runs/demo_seeds] [--config.K=V ...]

Extra ``--config.K=V`` arguments go to every seed's demo (e.g. to try a recipe change).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

STAGES = ("init", "sft", "mpo", "grpo")


def run_seed(seed: int, out: str, overrides: list[str]) -> dict:
    run_dir = os.path.join(out, f"seed{seed}")
    path = os.path.join(run_dir, "summary.json")
    timing = os.path.join(run_dir, "bench_time.json")
    if not os.path.exists(path):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        cmd = [
            sys.executable,
            "-m",
            "r1v2_jax.cli",
            "demo",
            "--out",
            run_dir,
            f"--config.seed={seed}",
            "--config.progress=False",
            *overrides,
        ]
        with open(os.path.join(out, f"seed{seed}.log"), "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        with open(timing, "w") as f:
            json.dump({"wall_s": time.perf_counter() - t0, "cpu_s": cpu, "overrides": overrides}, f)
    with open(path) as f:
        summary = json.load(f)
    t = json.load(open(timing)) if os.path.exists(timing) else {"wall_s": summary["seconds"], "cpu_s": float("nan")}
    row = {
        "seed": seed,
        **{s: summary["evals"][s]["pass@1"] for s in STAGES if s in summary["evals"]},
        "n": summary["evals"]["init"]["n"],
        "wall_s": t["wall_s"],
        "cpu_s": t["cpu_s"],
    }
    return row


def table(rows: list[dict]) -> str:
    head = ["seed", *STAGES, "wall s", "CPU s"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        lines.append(
            " | ".join(
                [
                    str(r["seed"]),
                    *(f"{r.get(s, float('nan')):.3f}" for s in STAGES),
                    f"{r['wall_s']:.0f}",
                    f"{r['cpu_s']:.0f}",
                ]
            )
        )
    mean = {s: sum(r.get(s, float("nan")) for r in rows) / len(rows) for s in STAGES}
    lines.append(
        " | ".join(
            [
                "mean",
                *(f"{mean[s]:.3f}" for s in STAGES),
                f"{sum(r['wall_s'] for r in rows) / len(rows):.0f}",
                f"{sum(r['cpu_s'] for r in rows) / len(rows):.0f}",
            ]
        )
    )
    ran = set.intersection(*(set(r) for r in rows))  # a run of some stages only (--config.stages=...)
    verdicts = []
    if {"grpo", "sft"} <= ran:
        verdicts.append(f"GRPO > SFT on every seed: {all(r['grpo'] > r['sft'] for r in rows)}")
    if {"mpo", "sft"} <= ran:
        verdicts.append(f"mean MPO >= mean SFT: {mean['mpo'] >= mean['sft']} ({mean['mpo']:.3f} vs {mean['sft']:.3f})")
    lines.append("; ".join([*verdicts, f"held-out questions per seed: {rows[0]['n']}"]))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--out", default="runs/demo_seeds")
    a, overrides = ap.parse_known_args()
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        ap.error(f"unknown arguments {bad} (only --config.K=V overrides pass through)")
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        rows.append(run_seed(seed, a.out, overrides))
        print(
            f"seed {seed}: "
            + ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items() if k != "seed"
            ),
            flush=True,
        )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
