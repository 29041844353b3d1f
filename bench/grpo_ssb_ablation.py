#!/usr/bin/env python3
"""GRPO with and without the Selective Sample Buffer on the same seeds, side by side.

Runs the CPU demo's SFT cold start once per seed, then GRPO twice from it (SSB on / off), and
prints per-step effective-sample share and mean reward of both runs, plus held-out pass@1.

    python bench/grpo_ssb_ablation.py [--seeds 0,1] [--grpo-steps 120] [--out runs/ssb_ablation]
"""

import argparse
import json
import os
import shutil

from r1v2_jax.train.experiment import demo_config, run_experiment


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--grpo-steps", type=int, default=120)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--out", default="runs/ssb_ablation")
    a = ap.parse_args()
    for seed in [int(s) for s in a.seeds.split(",")]:
        base = os.path.join(a.out, f"seed{seed}")
        results = {}
        for ssb in (True, False):
            run_dir = os.path.join(base, "ssb" if ssb else "no_ssb")
            c = demo_config()
            c.run_dir, c.seed, c.stages, c.export, c.progress = run_dir, seed, ("sft", "grpo"), False, False
            c.grpo.reward_model.kind = "none"  # no rm stage here: rule + format
            c.grpo.steps, c.grpo.use_ssb = a.grpo_steps, ssb
            if not ssb and os.path.isdir(os.path.join(base, "ssb", "checkpoints", "sft")):
                # the same SFT start: reuse the SSB run's cold start
                os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
                if not os.path.exists(os.path.join(run_dir, "checkpoints", "sft")):
                    shutil.copytree(
                        os.path.join(base, "ssb", "checkpoints", "sft"), os.path.join(run_dir, "checkpoints", "sft")
                    )
            summary = run_experiment(c)
            results[ssb] = ({r["step"]: r for r in rows(run_dir) if r["stage"] == "grpo"}, summary["evals"])
        print(f"\nseed {seed}: GRPO with vs without SSB (effective share = samples with non-zero advantage)")
        print(
            f"{'step':>5} | {'eff. share w/o SSB':>18} | {'eff. share with SSB':>19} | "
            f"{'reward w/o':>10} | {'reward with':>11}"
        )
        print("-" * 76)
        on, off = results[True][0], results[False][0]
        for step in sorted(on):
            if step % a.every == 0 or step == max(on):
                print(
                    f"{step:>5} | {off[step]['effective_share_before']:18.2f} | "
                    f"{on[step]['effective_share_after']:19.2f} | {off[step]['reward_total']:10.3f} | "
                    f"{on[step]['reward_total']:11.3f}"
                )
        for ssb in (False, True):
            ev = results[ssb][1]
            print(
                f"held-out pass@1 {'with' if ssb else 'w/o '} SSB: after SFT {ev['sft']['pass@1']:.3f}, "
                f"after GRPO {ev['grpo']['pass@1']:.3f}"
            )


if __name__ == "__main__":
    main()
