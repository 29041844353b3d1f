#!/usr/bin/env python3
"""Answer-checking throughput: in-process ``check`` against the bounded ``VerifierPool``.

A GRPO-like batch of completions in the released format (``...</think>`` + an answer):
correct and wrong numeric answers in several notations, multiple choice, and a share of
pathological ones (power towers sympy tries to evaluate, thousands of unclosed
``\\boxed{``). For each way of scoring it prints answers per second, the slowest answer's
cost, and what the pathological answers scored; then the pool's cold start (first batch of
a fresh pool, workers warming up) and the batch right after a timed-out answer.

    python bench/verifier_throughput.py [--n 256] [--bad 0.02] [--timeout 2] [--workers 1,2,4] [--in-process]

``--in-process`` adds the unbounded in-process checker (a pathological answer can then cost
minutes: that row is what the pool exists to avoid).
"""

import argparse
import random
import time

from r1v2_jax.rewards.verifier import VerifierPool, check

GOOD = [
    ("so</think>\\boxed{\\frac{1}{2}}", "0.5", []),
    ("</think>The answer is 12.", "12", []),
    ("x</think>\\boxed{3\\sqrt{2}}", "\\sqrt{18}", []),
    ("y</think>\\boxed{B}", "B", ["1", "2", "3"]),
    ("z</think>\\boxed{[1, 3)}", "[1,3)", []),
    ("w</think>\\boxed{1e3}", "1000", []),
]
WRONG = [
    ("so</think>\\boxed{\\frac{1}{3}}", "0.5", []),
    ("</think>The answer is 13.", "12", []),
    ("y</think>\\boxed{C}", "B", ["1", "2", "3"]),
    ("q</think>\\boxed{x^2+1}", "x^2-1", []),
]
BAD = [("t</think>\\boxed{9^{9^{9^{9^{9^{9}}}}}}", "1", []), ("t</think>" + "\\boxed{" * 4000, "1", [])]


def batch(n: int, bad_share: float, seed: int = 0):
    rng = random.Random(seed)
    items, kinds = [], []
    for _ in range(n):
        r = rng.random()
        kind = "bad" if r < bad_share else "good" if r < 0.5 + bad_share / 2 else "wrong"
        items.append(rng.choice({"bad": BAD, "good": GOOD, "wrong": WRONG}[kind]))
        kinds.append(kind)
    return items, kinds


def timed_scores(score_one_by_one, items):
    per = []
    out = []
    for it in items:
        t = time.perf_counter()
        out.append(score_one_by_one(it))
        per.append(time.perf_counter() - t)
    return out, per


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--bad", type=float, default=0.02, help="share of pathological answers")
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--in-process", action="store_true")
    a = ap.parse_args()
    items, kinds = batch(a.n, a.bad)
    n_bad = kinds.count("bad")
    print(f"{a.n} answers ({n_bad} pathological), bound {a.timeout:g} s per answer\n")
    print("| scorer | answers/s | batch s | slowest answer s | pathological scored 0 | timeouts |")
    print("|---|---|---|---|---|---|")
    if a.in_process:
        t = time.perf_counter()
        out, per = timed_scores(lambda it: check(*it), items)
        dt = time.perf_counter() - t
        zero = sum(o == 0 for o, k in zip(out, kinds) if k == "bad")
        print(f"| in-process check (unbounded) | {a.n / dt:.1f} | {dt:.2f} | {max(per):.2f} | {zero}/{n_bad} | - |")
    for w in (int(x) for x in a.workers.split(",")):
        with VerifierPool(num_workers=w, timeout=a.timeout) as pool:
            t = time.perf_counter()
            pool.score(items[:1])
            cold = time.perf_counter() - t
            t = time.perf_counter()
            out = pool.score(items)
            dt = time.perf_counter() - t
            zero = sum(o == 0 for o, k in zip(out, kinds) if k == "bad")
            print(
                f"| VerifierPool, {w} worker(s) | {a.n / dt:.1f} | {dt:.2f} | <= {a.timeout:g} (bound) | "
                f"{zero}/{n_bad} | {pool.errors['timeout']} |"
            )
            t = time.perf_counter()
            after = pool.score([g for g in GOOD for _ in range(4)])
            dt_after = time.perf_counter() - t
            print(
                f"|   cold start (first answer of a fresh pool) {cold:.2f} s; 24 good answers right after the "
                f"timeouts: {dt_after:.2f} s, {sum(after):.0f}/24 scored 1 | | | | | |"
            )


if __name__ == "__main__":
    main()
