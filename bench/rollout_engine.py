#!/usr/bin/env python3
"""A long-tailed rollout workload on three engines, side by side, same weights (issue #16, point 5).

    python bench/rollout_engine.py [--preset small] [--prompts 16] [--group 8] [--max-new 256] [--slots 32]

16 prompts x G = 8 samples at temperature 1 (no top-k / top-p), at most 256 new tokens. The
eos ids are a random set of tokens whose probability mass at the prompts' first step is about
1 / (max_new / 4): each step then stops a sample with that chance, so completion lengths are
geometric with a mean near a quarter of the maximum and a few reach it (the histogram is
printed). The three engines:

* ``paged``: :class:`r1v2_jax.sampling.engine.PagedEngine` (paged KV cache, ``--slots``
  decode slots, continuous batching, host every ``--sync`` steps);
* ``static``: :class:`r1v2_jax.sampling.sampler.Sampler`, one dense cache for all 128 rows,
  the loop runs until the longest row finishes;
* ``transformers``: ``generate`` (do_sample, top_k=0, the same eos ids), a static batch too.

The paged and static engines sample the same tokens for the same seed (per-sample keys), which
the script checks. Useful tokens are the generated tokens up to and including eos; each engine
is timed after a warm-up call on the same workload (compilation excluded; transformers, which
compiles nothing, on its first call). KV memory: the paged
pool as allocated (and the most pages in use) against the static sampler's dense cache.
"""

import argparse
import os
import sys
import time

import numpy as np


def pick_eos(model, prompts, target_mass: float, seed: int = 0) -> tuple[int, ...]:
    """Random token ids, added until their mean first-step probability reaches target_mass."""
    import jax

    logits = np.asarray(model(np.asarray(prompts)))[:, -1].astype(np.float64)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1)).mean(axis=0)
    order = np.random.default_rng(seed).permutation(len(probs))
    order = order[order < model.config.image_token_id]
    k = int(np.searchsorted(np.cumsum(probs[order]), target_mass)) + 1
    return tuple(int(i) for i in np.sort(order[:k]))


def histogram(lengths, max_new: int, bins: int = 8) -> str:
    edges = np.linspace(0, max_new, bins + 1).astype(int)
    counts, _ = np.histogram(lengths, bins=edges)
    width = max(counts.max(), 1)
    return "\n".join(
        f"  {lo + 1:>4}-{hi:<4} {c:>4} {'#' * int(40 * c / width)}" for lo, hi, c in zip(edges[:-1], edges[1:], counts)
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--sync", type=int, default=8)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--skip-transformers", action="store_true")
    a = p.parse_args()

    import jax
    import torch
    from decode_throughput import torch_model

    import r1v2_jax
    from r1v2_jax.sampling.engine import EngineConfig, PagedEngine
    from r1v2_jax.sampling.sampler import Sampler, SamplingParams

    torch.set_num_threads(os.cpu_count())
    model = r1v2_jax.init_model(a.preset, seed=0)
    vocab = model.config.text.vocab_size
    prompts = np.random.default_rng(1).integers(0, min(vocab, 150000), (a.prompts, a.prompt_len)).astype(np.int32)
    eos = pick_eos(model, prompts, 4.0 / a.max_new)
    sp = SamplingParams(max_new_tokens=a.max_new, temperature=1.0, eos_ids=eos, pad_id=eos[0])
    g = a.group
    engine = PagedEngine(model, EngineConfig(slots=a.slots, steps_per_sync=a.sync, page_size=a.page_size))
    static = Sampler(model)
    results = {}

    def timed(name, fn, warm=True):
        if warm:
            fn()  # warm-up (compiles)
        t = time.perf_counter()
        out = fn()
        results[name] = (time.perf_counter() - t, out)

    timed("paged", lambda: jax.device_get(engine(prompts, sp=sp, num_samples=g, seed=0)))
    timed("static", lambda: jax.device_get(static(prompts, sp=sp, num_samples=g, seed=0)))
    lengths = {k: np.asarray(v[1].lengths) for k, v in results.items()}
    same = np.array_equal(np.asarray(results["paged"][1].tokens), np.asarray(results["static"][1].tokens))
    if not a.skip_transformers:
        hf = torch_model(model)

        def run_hf():
            with torch.no_grad():
                return hf.generate(
                    input_ids=torch.tensor(prompts, dtype=torch.long),
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=a.max_new,
                    num_return_sequences=g,
                    eos_token_id=list(eos),
                    pad_token_id=eos[0],
                )

        timed("transformers", run_hf, warm=False)  # nothing to compile
        gen = results["transformers"][1][:, a.prompt_len :].numpy()
        is_eos = np.isin(gen, eos)
        lengths["transformers"] = np.where(is_eos.any(1), is_eos.argmax(1) + 1, gen.shape[1])

    st = engine.stats
    print(
        f"\nrollout workload: preset {a.preset}, {a.prompts} prompts x G={g}, prompt {a.prompt_len}, temperature 1, "
        f"max {a.max_new} new tokens, {len(eos)} eos ids; {os.cpu_count()} CPUs, jax {jax.__version__}"
    )
    print(
        f"completion lengths (paged = static: same tokens {same}): mean {lengths['paged'].mean():.1f}, median "
        f"{np.median(lengths['paged']):.0f}, max {lengths['paged'].max()}, {int((lengths['paged'] == a.max_new).sum())} "
        f"at the maximum"
    )
    print(histogram(lengths["paged"], a.max_new))
    base = lengths["paged"].sum() / results["paged"][0]
    print(
        f"\n{'engine':>12} | {'time s':>7} | {'useful tokens':>13} | {'useful tok/s':>12} | {'paged is':>9} | KV memory"
    )
    print("-" * 84)
    kv_dense = st["dense_bytes"]
    for name, (t, _) in results.items():
        useful = int(lengths[name].sum())
        kv = {
            "paged": f"{st['num_pages'] * st['page_bytes'] / 2**20:.1f} MiB pool ({st['peak_pages'] * st['page_bytes'] / 2**20:.1f} "
            f"MiB peak in use) = {st['num_pages'] * st['page_bytes'] / kv_dense:.0%} of dense",
            "static": f"{kv_dense / 2**20:.1f} MiB dense cache",
        }.get(name, "")
        print(f"{name:>12} | {t:7.1f} | {useful:13d} | {useful / t:12.1f} | {base / (useful / t):8.2f}x | {kv}")
    print(
        f"\npaged: {a.slots} slots, host every {a.sync} steps, pages of {a.page_size}: {st['decode_steps']} decode "
        f"steps in {st['blocks']} blocks, prefill batches {st['prefill_batches']}, {st['cow_copies']} "
        f"copy-on-write pages"
    )


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
