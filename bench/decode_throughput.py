#!/usr/bin/env python3
"""Decode throughput of the jitted sampler against transformers ``generate``, side by side.

    python bench/decode_throughput.py [--shapes small,qwq12] [--batches 1,8] [--new-tokens N] [--prompt-len N]

Two model shapes (float32, random weights, the same weights in both engines):

* ``small``: the ``small`` preset (8 layers, hidden 384, 152k vocabulary: the head is half
  the decoder's bytes); default 32-token prompts + 128 new tokens;
* ``qwq12``: a released-format checkpoint (written with ``save_released`` and read back with
  ``load_pretrained``) shaped like a scaled-down QwQ where the layers, not the vocabulary,
  dominate: 12 layers, hidden 768, 12 query / 4 KV heads, MLP 2048, vocabulary 32k; default
  64 + 64 tokens (issue #16, point 6).

Greedy, with a KV cache, exactly ``new-tokens`` tokens. r1v2-jax runs with the default
unrolled decode layer loop and, for comparison, with ``layer_loop="scan"`` (the layer scan
inside the token loop, which copies every layer's weights at each step on XLA:CPU). JAX is
timed after one warm-up call (compilation excluded), best of two; transformers after one
warm-up call. Batch 1 is also given as a fraction of the memory-bandwidth bound: the bytes of
the decoder parameters read per token (embedding table excluded: one row is read) over a
measured copy bandwidth (read + write counted). The machine is shared: figures vary.

``matmul floor``: the decode step's matrix products alone (q, k, v, o, gate, up, down of every
layer and the LM head, at the shape's widths and the batch, float32, random weights), in a
jitted loop of ``new-tokens`` steps: no attention, norms, sampling or cache. No decode engine
on this CPU can beat it with XLA's matmul, so ``floor / transformers`` is the ratio an engine
doing nothing but those products would reach.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

SHAPES = {"small": (32, 128), "qwq12": (64, 64)}  # default (prompt, new tokens)


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


def qwq12_config():
    from r1v2_jax.model.config import ModelConfig, TextConfig, VisionConfig

    return ModelConfig(
        vision=VisionConfig(
            hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, image_size=56, patch_size=14
        ),
        text=TextConfig(
            vocab_size=32000,
            hidden_size=768,
            num_layers=12,
            num_heads=12,
            num_kv_heads=4,
            intermediate_size=2048,
            max_position_embeddings=4096,
        ),
        image_token_id=31999,
    )


def load_shape(name: str, tmp: str):
    import r1v2_jax

    if name == "small":
        return r1v2_jax.init_model("small", seed=0)
    if name == "qwq12":
        d = os.path.join(tmp, "qwq12")
        r1v2_jax.save_released(r1v2_jax.init_model(qwq12_config(), seed=0), d)
        return r1v2_jax.load_pretrained(d)
    raise SystemExit(f"--shapes: unknown shape {name!r}; known: {sorted(SHAPES)}")


def torch_model(model):
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from r1v2_jax.convert.keymap import params_to_released
    from r1v2_jax.convert.transformers_format import native_config_dict, released_to_native

    d = native_config_dict(model.config, "float32")
    cfg = InternVLConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type", "torch_dtype")})
    hf = InternVLForConditionalGeneration(cfg)
    sd = {
        k: torch.from_numpy(np.ascontiguousarray(v))
        for k, v in released_to_native(dict(params_to_released(model.params, model.config)))
    }
    hf.load_state_dict(sd, strict=True)
    return hf.eval()


def matmul_floor(cfg, batch: int, steps: int) -> float:
    """Tokens/s of the decoder's matrix products alone (module docstring), best of three."""
    import jax
    import jax.numpy as jnp

    c = cfg.text
    hd = c.resolved_head_dim
    shapes = [
        (c.hidden_size, c.num_heads * hd),
        (c.hidden_size, c.num_kv_heads * hd),
        (c.hidden_size, c.num_kv_heads * hd),
        (c.num_heads * hd, c.hidden_size),
        (c.hidden_size, c.intermediate_size),
        (c.hidden_size, c.intermediate_size),
        (c.intermediate_size, c.hidden_size),
    ]
    rng = np.random.default_rng(0)
    w = [[jnp.asarray(rng.standard_normal(s, np.float32) * 0.02) for s in shapes] for _ in range(c.num_layers)]
    head = jnp.asarray(rng.standard_normal((c.hidden_size, c.vocab_size), np.float32) * 0.02)

    def step(x):
        for q, k, v, o, g, u, d in w:
            h = (x @ q)[:, : o.shape[0]] + (x @ k).sum() + (x @ v).sum()
            x = x + h @ o
            x = x + ((x @ g) * (x @ u)) @ d
        return x + (x @ head)[:, : x.shape[1]] * 1e-3

    loop = jax.jit(lambda x: jax.lax.fori_loop(0, steps, lambda i, x: step(x), x))
    x = jnp.asarray(rng.standard_normal((batch, c.hidden_size), np.float32))
    jax.block_until_ready(loop(x))
    return batch * steps / min(_timed(lambda: jax.block_until_ready(loop(x))) for _ in range(3))


def bench_shape(name, model, batches, prompt_len, new_tokens):
    import jax
    import torch

    from r1v2_jax.sampling.sampler import Sampler, SamplingParams

    hf = torch_model(model)
    samplers = {loop: Sampler(model, layer_loop=loop) for loop in ("unrolled", "scan")}
    sp = SamplingParams(max_new_tokens=new_tokens)
    vocab = model.config.text.vocab_size
    rows = []
    for b in batches:
        ids = np.random.default_rng(b).integers(0, vocab - 2, (b, prompt_len)).astype(np.int32)
        tps = {}
        for loop, s in samplers.items():
            run = lambda s=s, ids=ids: jax.block_until_ready(s(ids, sp=sp).tokens)
            run()
            tps[loop] = b * new_tokens / min(_timed(run) for _ in range(2))
        tids = torch.tensor(ids, dtype=torch.long)
        with torch.no_grad():
            run_hf = lambda tids=tids: hf.generate(
                input_ids=tids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0
            )
            run_hf()
            t_hf = _timed(run_hf)
            theirs = run_hf().numpy()
        same = np.array_equal(np.asarray(samplers["unrolled"](ids, sp=sp).tokens), theirs)
        floor = matmul_floor(model.config, b, new_tokens)
        rows.append((name, b, tps["unrolled"], tps["scan"], b * new_tokens / t_hf, floor, same))
    llm = model.params["language_model"]
    import r1v2_jax

    param_bytes = (r1v2_jax.count_params(llm) - llm["embed_tokens"]["embedding"].size) * 4
    return rows, param_bytes


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="small,qwq12")
    p.add_argument("--new-tokens", type=int, default=None, help="default: per shape (small 128, qwq12 64)")
    p.add_argument("--prompt-len", type=int, default=None, help="default: per shape (small 32, qwq12 64)")
    p.add_argument("--batches", default="1,8")
    a = p.parse_args()

    import jax
    import torch

    torch.set_num_threads(os.cpu_count())
    batches = [int(x) for x in a.batches.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.shapes.split(","):
            plen, new = SHAPES.get(name, (None, None))
            model = load_shape(name, tmp)
            plen, new = a.prompt_len or plen, a.new_tokens or new
            rows, param_bytes = bench_shape(name, model, batches, plen, new)
            results.append((name, plen, new, rows, param_bytes))
            del model
    bw = copy_bandwidth()
    print(
        f"\ndecode throughput: float32, greedy, {os.cpu_count()} CPUs, jax {jax.__version__} / torch "
        f"{torch.__version__}; copy bandwidth {bw / 1e9:.1f} GB/s"
    )
    print(
        f"{'shape':>6} | {'tokens':>8} | {'batch':>5} | {'r1v2-jax tok/s':>14} | {'(scan) tok/s':>12} | "
        f"{'transformers':>12} | {'ratio':>5} | {'of bound':>8} | {'matmul floor':>12} | {'of floor':>8} | "
        f"{'floor/transformers':>18} | same tokens"
    )
    print("-" * 155)
    for name, plen, new, rows, param_bytes in results:
        bound = bw / param_bytes
        for _, b, tj, ts, th, floor, same in rows:
            frac = f"{tj / bound:8.0%}" if b == 1 else " " * 8
            print(
                f"{name:>6} | {plen:>3}+{new:<4} | {b:>5} | {tj:14.1f} | {ts:12.1f} | {th:12.1f} | {tj / th:5.2f} | "
                f"{frac} | {floor:12.1f} | {tj / floor:8.0%} | {floor / th:18.2f} | {same}"
            )
    print()
    for name, _, _, _, param_bytes in results:
        print(
            f"bandwidth bound at batch 1, {name}: {param_bytes / 1e6:.0f} MB of decoder parameters per token -> "
            f"{bw / param_bytes:.1f} tok/s"
        )


if __name__ == "__main__":
    sys.exit(main())
