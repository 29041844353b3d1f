#!/usr/bin/env python3
"""Decode throughput of the jitted sampler against transformers ``generate``, side by side.

    python bench/decode_throughput.py [--preset small] [--new-tokens 128] [--batches 1,8,32]

Both run the same weights (float32, random init of the preset) on the same text prompts,
greedy, with a KV cache, for exactly ``--new-tokens`` tokens; JAX is timed after one warm-up
call (compilation excluded), transformers after one warm-up call too. The batch-1 figure is
also given as a fraction of the memory-bandwidth bound: the bytes of the decoder parameters
read per token (embedding table excluded: one row is read) over a measured copy bandwidth.
"""

import argparse
import os
import sys
import time

import numpy as np


def copy_bandwidth(nbytes=512 * 1024**2, reps=5) -> float:
    """Bytes/s moved by a large numpy copy (read + write counted)."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(reps))
    return 2 * nbytes / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def torch_model(model):
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from r1v2_jax.convert.keymap import params_to_released
    from r1v2_jax.convert.transformers_format import native_config_dict, released_to_native

    d = native_config_dict(model.config, "float32")
    cfg = InternVLConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type", "torch_dtype")})
    hf = InternVLForConditionalGeneration(cfg)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
          released_to_native(dict(params_to_released(model.params, model.config)))}
    hf.load_state_dict(sd, strict=True)
    return hf.eval()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--batches", default="1,8,32")
    a = p.parse_args()

    import jax
    import torch

    import r1v2_jax
    from r1v2_jax.sampling.sampler import Sampler, SamplingParams

    torch.set_num_threads(os.cpu_count())
    model = r1v2_jax.init_model(a.preset, seed=0)
    hf = torch_model(model)
    sampler = Sampler(model)
    sp = SamplingParams(max_new_tokens=a.new_tokens)
    n = a.new_tokens
    rows = []
    for b in [int(x) for x in a.batches.split(",")]:
        ids = np.random.default_rng(b).integers(0, 150000, (b, a.prompt_len)).astype(np.int32)
        run_jax = lambda: jax.block_until_ready(sampler(ids, sp=sp).tokens)  # noqa: E731
        run_jax()
        t_jax = min(_timed(run_jax) for _ in range(2))
        tids = torch.tensor(ids, dtype=torch.long)
        with torch.no_grad():
            run_hf = lambda: hf.generate(input_ids=tids, do_sample=False, max_new_tokens=n,  # noqa: E731
                                         min_new_tokens=n, pad_token_id=0)
            run_hf()
            t_hf = _timed(run_hf)
        same = np.array_equal(np.asarray(sampler(ids, sp=sp).tokens), run_hf().numpy())
        rows.append((b, b * n / t_jax, b * n / t_hf, same))
    llm = model.params["language_model"]
    param_bytes = (r1v2_jax.count_params(llm) - llm["embed_tokens"]["embedding"].size) * 4
    bw = copy_bandwidth()
    bound = bw / param_bytes
    print(f"\ndecode throughput: preset {a.preset}, float32, greedy, prompt {a.prompt_len} + {n} new tokens, "
          f"{os.cpu_count()} CPUs, jax {jax.__version__} / torch {torch.__version__}")
    print(f"{'batch':>5} | {'r1v2-jax tok/s':>14} | {'transformers tok/s':>18} | {'ratio':>6} | same tokens")
    print("-" * 68)
    for b, tj, th, same in rows:
        print(f"{b:>5} | {tj:14.1f} | {th:18.1f} | {tj / th:6.2f} | {same}")
    print(f"\nbandwidth bound at batch 1: {param_bytes / 1e6:.0f} MB of decoder parameters per token, copy bandwidth "
          f"{bw / 1e9:.1f} GB/s -> {bound:.1f} tok/s; r1v2-jax reaches {rows[0][1] / bound:.0%} of it"
          if rows and rows[0][0] == 1 else "")


if __name__ == "__main__":
    sys.exit(main())
