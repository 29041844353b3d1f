#!/usr/bin/env python3
"""Conversion throughput, side by side in one run: a plain read of the checkpoint's bytes
versus hf_to_jax (released -> ours) and jax_to_hf (ours -> released).

    python bench/convert_throughput.py              # real 38B widths, 2 layers per tower (~5.7 GB)
    python bench/convert_throughput.py --preset small

Each step runs in a fresh process (so its peak RSS is its own); MB/s counts the checkpoint's
tensor bytes. The plain read runs after the checkpoint was just written, as do the
conversions, so all three see the same page-cache state.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

_STEP = (
    "import resource, sys, time; from r1v2_jax.convert.cli import {fn}; t = time.perf_counter(); "
    "rc = {fn}(sys.argv[1:]); print('STEP', time.perf_counter() - t, "
    "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
)
_READ = (
    "import os, resource, sys, time; t = time.perf_counter(); n = 0\n"
    "for f in sorted(os.listdir(sys.argv[1])):\n"
    "    if f.endswith('.safetensors'):\n"
    "        with open(os.path.join(sys.argv[1], f), 'rb', buffering=0) as h:\n"
    "            while True:\n"
    "                b = h.read(64 << 20)\n"
    "                if not b: break\n"
    "                n += len(b)\n"
    "print('STEP', time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
)


def step(code, *args):
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        sys.exit(r.stderr)
    secs, rss = [ln for ln in r.stdout.splitlines() if ln.startswith("STEP")][0].split()[1:]
    return float(secs), int(rss) * 1024


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wide", choices=["wide", "small", "tiny"])
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    a = p.parse_args()
    tmp = a.dir or tempfile.mkdtemp(prefix="r1v2-bench-")
    src, ours, back = (os.path.join(tmp, n) for n in ("src", "ours", "back"))
    try:
        # Written by a child process, so this process stays small (a child's peak RSS can
        # include its parent's at fork time).
        code = (
            "import sys; sys.path.insert(0, 'tests'); from test_convert_memory import *; "
            "from r1v2_jax.model.config import model_config; "
            f"cfg = wide_config() if {a.preset!r} == 'wide' else model_config({a.preset!r}); "
            "print('LARGEST', write_synthetic_released(cfg, sys.argv[1]))"
        )
        r = subprocess.run([sys.executable, "-c", code, src], capture_output=True, text=True, cwd=ROOT, check=True)
        largest = int(r.stdout.split("LARGEST")[1])
        total = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors"))
        rows = [
            ("plain read of the shards", *step(_READ, src)),
            ("hf_to_jax (released -> ours)", *step(_STEP.format(fn="main_hf_to_jax"), src, ours, "--quiet")),
            ("jax_to_hf (ours -> released)", *step(_STEP.format(fn="main_jax_to_hf"), ours, back, "--quiet")),
        ]
    finally:
        if a.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0][1]
    print(
        f"\nconversion throughput: {a.preset} ({total / 1e9:.2f} GB of tensors, largest {largest / 1e9:.2f} GB), "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}"
    )
    print(f"{'step':<30} | {'seconds':>8} | {'MB/s':>8} | {'x plain read time':>17} | {'peak RSS GB':>11}")
    print("-" * 86)
    for name, secs, rss in rows:
        print(f"{name:<30} | {secs:8.2f} | {total / secs / 1e6:8.0f} | {secs / base:17.1f} | {rss / 1e9:11.2f}")


if __name__ == "__main__":
    main()
