"""The README's planning table: for GRPO (G=8, 8k completions) and MPO on the 38B model, with
adapter-only, adapter+LLM and full training, the smallest v5p / v6e slice that fits, from
``r1v2 plan`` (ahead-of-time compilation for the abstract topology, on this machine).

    python bench/plan_table.py [--families v5p v6e] [--out plan_table.jsonl]

For each row it tries slices from a starting size (``--start``, else a guess per trainable)
upwards (doubling) and stops at the first that fits; when the starting size already fits, it
halves until a slice does not. The
micro-batch count is chosen so that every micro-batch has one sequence (GRPO) or one pair
(MPO) per FSDP group. When the train step's temporaries alone exceed a chip's
HBM by a quarter, a bigger slice cannot help (those are per-sequence activations, and the
micro-batch already holds one sequence per device group; only the parameter share shrinks):
the row says so and the search stops.
The sampler runs on the learner's mesh here (the configs' data-parallel sampler mesh is
planned separately in the README). Each plan runs in its own process (one to three minutes
each for the 38B model) without XLA's step-time estimate; ``--xla`` plans each row's chosen
slice once more with it (about six minutes a row) and adds its column; ``--replan`` plans
the stored rows' slices again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024**3
CONFIGS = {"grpo": "configs/grpo_38b.py", "mpo": "configs/mpo_38b.py"}
ROWS = {"grpo": 32 * 8, "mpo": 64}  # sequences (GRPO rollouts) or pairs (MPO) per step, from the configs
# tensor parallelism: a v5p host has 4 chips, a v6e host 4-8; MPO holds two sequences (chosen and
# rejected) per pair, so on v5p it splits them twice as wide. Not 16: the 38B LLM's 40 heads do
# not divide by 16, so attention would be replicated over the tensor axis.
TENSOR = {("grpo", "v5p"): 4, ("grpo", "v6e"): 8, ("mpo", "v5p"): 8, ("mpo", "v6e"): 8}
CORES = {"v5p": 2, "v6e": 1}  # cores per chip in the slice name
START = {"adapter": 16, "adapter+llm": 32, "all": 64}  # chips to start from (parameters alone need about this)


def plan_once(algo: str, trainable: str, family: str, chips: int, xla: bool = False) -> dict:
    tp = TENSOR[algo, family]
    fsdp = chips // tp
    micro = max(ROWS[algo] // fsdp, 1)
    topology = f"{family}-{chips * CORES[family]}"
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [
        sys.executable,
        "-m",
        "r1v2_jax.cli",
        "plan",
        "--config",
        CONFIGS[algo],
        "--topology",
        topology,
        "--json",
        out,
        f"--config.{algo}.optim.trainable={trainable}",
        f"--config.{algo}.micro_batches={micro}",
        f"--config.plan.mesh=(1,{fsdp},{tp})",
        f"--config.plan.sampler_mesh=(1,{fsdp},{tp})",
        f"--config.plan.xla_estimate={xla}",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    with open(out) as f:
        rep = json.load(f) if os.path.getsize(out) else None
    os.unlink(out)
    if rep is None:  # --json is written after the report; exit 1 (does not fit) still writes it
        raise RuntimeError(f"{' '.join(cmd)} wrote no report:\n{r.stdout[-2000:]}")
    rep["micro_batches"] = micro
    return rep


def start_chips(trainable: str, family: str, start: int | None = None) -> int:
    """Chips the search starts from: ``start`` when given (``--start``), else START's guess."""
    if start:
        return start
    return START[trainable] if family == "v5p" else START[trainable] * 2


def _log_try(log, algo: str, trainable: str, rep: dict) -> None:
    log(
        f"  {algo} {trainable:<11} {rep['topology']:>8}: peak {rep['peak_bytes'] / GiB:6.1f} GiB of "
        f"{rep['hbm_per_chip'] / GiB:.0f} -> {'fits' if rep['fits'] else 'no'}"
    )


def refine_down(row: dict, log) -> dict:
    """A row that fitted at its starting slice: try halving until it stops fitting."""
    algo, trainable, family = row["algorithm"], row["trainable"], row["family"]
    chips = row["report"]["chips"] // 2
    while chips >= TENSOR[algo, family]:
        rep = plan_once(algo, trainable, family, chips)
        _log_try(log, algo, trainable, rep)
        if not rep["fits"]:
            break
        row = dict(row, report=rep)
        chips //= 2
    return dict(row, refined=True)


def search(algo: str, trainable: str, family: str, max_chips: int, log, start: int | None = None) -> dict:
    chips = start_chips(trainable, family, start)
    tried = []
    while chips <= max_chips:
        rep = plan_once(algo, trainable, family, chips)
        tried.append(rep)
        train = rep["programs"]["train"]
        _log_try(log, algo, trainable, rep)
        if rep["fits"]:
            row = {"algorithm": algo, "trainable": trainable, "family": family, "fits": True, "report": rep}
            return refine_down(row, log) if len(tried) == 1 else row
        if train["temp_bytes"] > 1.25 * rep["hbm_per_chip"]:
            return {
                "algorithm": algo,
                "trainable": trainable,
                "family": family,
                "fits": False,
                "report": rep,
                "why": f"train-step activations alone ({train['temp_bytes'] / GiB:.0f} GiB/chip) exceed HBM",
            }
        chips *= 2
    return {
        "algorithm": algo,
        "trainable": trainable,
        "family": family,
        "fits": False,
        "report": tried[-1] if tried else None,
        "why": f"does not fit up to {max_chips} chips",
    }


def replan(row: dict, xla: bool) -> dict:
    """The row's chosen slice planned once more (with XLA's step-time estimate when ``xla``)."""
    return dict(
        row, report=plan_once(row["algorithm"], row["trainable"], row["family"], row["report"]["chips"], xla=xla)
    )


def table(rows: list[dict]) -> str:
    out = [
        "| stage | trainable | smallest slice | mesh (data, fsdp, tensor) | micro-batches | peak GiB/chip (of HBM) "
        "| roofline step s (train / rollout) | MFU | XLA step s (train / rollout) | XLA MFU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rep = r["report"]
        name = {"grpo": "GRPO G=8, 4k+8k", "mpo": "MPO, 4k+8k pairs"}[r["algorithm"]]
        if not r["fits"]:
            peak = f"{rep['peak_bytes'] / GiB:.1f} ({rep['hbm_per_chip'] / GiB:.0f})" if rep else "-"
            out.append(f"| {name} | {r['trainable']} | {r['family']}: none ({r['why']}) | | | {peak} | | | | |")
            continue
        m = rep["mesh"]
        progs = rep["programs"]
        rollout = sum(p["seconds"] for k, p in progs.items() if k != "train")
        xla = "| | |"
        if rep.get("xla_step_seconds"):
            xla_rollout = sum(p["xla_seconds"] for k, p in progs.items() if k != "train")
            xla = (
                f"| {rep['xla_step_seconds']:.0f} ({progs['train']['xla_seconds']:.0f} / {xla_rollout:.0f}) | "
                f"{rep['xla_mfu']:.0%} |"
            )
        out.append(
            f"| {name} | {r['trainable']} | {rep['topology']} ({rep['chips']} chips) | "
            f"{m['data']}, {m['fsdp']}, {m['tensor']} | {rep['micro_batches']} | "
            f"{rep['peak_bytes'] / GiB:.1f} ({rep['hbm_per_chip'] / GiB:.0f}) | "
            f"{rep['step_seconds']:.0f} ({progs['train']['seconds']:.0f} / {rollout:.0f}) | "
            f"{rep['mfu']:.0%} {xla}"
        )
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["v5p", "v6e"], choices=["v5p", "v6e"])
    p.add_argument("--algorithms", nargs="+", default=["grpo", "mpo"], choices=sorted(CONFIGS))
    p.add_argument("--trainables", nargs="+", default=["adapter", "adapter+llm", "all"], choices=sorted(START))
    p.add_argument("--max-chips", type=int, default=256)
    p.add_argument(
        "--start",
        type=int,
        default=None,
        help="chips every search starts from (default: a guess per trainable; a smaller start saves the plans above)",
    )
    p.add_argument("--out", default=None, help="append each row as JSON to this file")
    p.add_argument("--xla", action="store_true", help="add XLA's step-time estimate for each row's slice")
    p.add_argument("--replan", action="store_true", help="plan each stored row's slice again (after a planner change)")
    a = p.parse_args()
    done = {}
    if a.out and os.path.exists(a.out):  # rerunning with the same --out continues where it stopped
        with open(a.out) as f:
            done = {(r["algorithm"], r["trainable"], r["family"]): r for r in map(json.loads, f)}  # last wins
    rows = []

    def keep(r: dict) -> None:  # the file's last row per (algorithm, trainable, family) wins
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(r) + "\n")

    for algo in a.algorithms:
        for trainable in a.trainables:
            for family in a.families:
                if (algo, trainable, family) in done:
                    r = done[algo, trainable, family]
                    if (
                        r["fits"]
                        and not r.get("refined")
                        and r["report"]["chips"] == start_chips(trainable, family, a.start)
                    ):
                        r = refine_down(r, lambda s: print(s, flush=True))
                        keep(r)
                    if r["fits"] and (a.replan or (a.xla and not r["report"].get("xla_step_seconds"))):
                        r = replan(r, a.xla)
                        print(f"  {algo} {trainable:<11} {r['report']['topology']:>8}: replanned", flush=True)
                        keep(r)
                    rows.append(r)
                    continue
                r = search(algo, trainable, family, a.max_chips, lambda s: print(s, flush=True), a.start)
                if a.xla and r["fits"]:
                    r = replan(r, xla=True)
                rows.append(r)
                keep(r)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
