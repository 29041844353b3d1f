"""The paged rollout engine planned at scale: decode time from what each token step must read.

A GRPO step decodes ``batch_size x group_size`` rows of up to ``max_new_tokens``. With a fixed
batch the rollout still lasts as long as its longest completion, so what can fall is the bytes
each step reads. The static sampler reads, per chip and token step, its tensor shard of every
weight plus its rows' whole dense KV cache (``P + M`` positions, finished or not). The paged
engine reads the weights and, per row still decoding, only that row's valid KV (its prompt
and the tokens it has so far): ragged paged attention on TPU. This module estimates that,
under an explicit distribution of completion lengths, for each sampler mesh
``(data, 1, tensor)`` the slice allows, and picks the fastest that fits.

Assumptions, all printed with the figures (``r1v2 plan``):

* **Completion lengths** (``plan.completion_dist``, ``plan.completion_mean_fraction``): the
  ``B x G`` lengths are the distribution's quantiles at ``(i + 0.5) / n`` (deterministic).
  Default: exponential with mean half the maximum, clipped to it (the mass beyond lands on the
  maximum: e^-2 = 13.5% of completions truncated). Why: long-CoT RL runs report mean
  response lengths around half the length cap with a tail that hits it (DAPO's and
  Skywork-OR1's overlong/truncation ratios of ~5-15%), and an exponential tail is the
  simplest shape with that mean and a truncated share in that range. ``max`` (every
  completion runs to the cap) gives the static sampler's worst case; ``uniform`` on
  ``[0, 2 x mean]``.
* Per step and chip: ``max(bytes / (HBM bandwidth x plan.assumed_bandwidth_util), FLOPs /
  peak)`` plus the tensor-parallel all-reduces (two per layer, ``slots x hidden`` bf16 each,
  ring: ``2 (t - 1) / t`` of it over the chip's ICI bandwidth, plus ``plan.collective_latency_s``
  each). FLOPs count every slot (finished slots still run through the compiled step) at the
  context of the longest live row. KV per token and chip: ``layers x 2 x ceil(kv_heads / t)``
  heads (K/V heads replicated when ``t`` exceeds them) ``x head_dim`` in the page dtype.
* Memory per chip (analytic, not compiled): the tensor shard of the weights, the page pool
  sized to the slots (each prompt's pages once for its G samples, every slot's worst case
  ``ceil(M / page) + 1`` pages: its completion and its copy-on-write page), the logits of one
  step in float32, and what stays resident (the learner's state, as for the dense programs).
* Weights per chip come from the model's real partitioning over each candidate mesh (the
  parameters' logical axes), not from a parameter count.

Not modelled: prefill (planned as today), host intervention every K steps, the vision tower.
Today's engine's XLA path attends over a power-of-two bucket of the longest live row's
pages: the "as run today" column charges every slot that bucket.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from r1v2_jax.parallel.sharding import make_mesh
from r1v2_jax.plan.flops import forward_flops
from r1v2_jax.plan.programs import abstract_param_specs, gathered_bytes
from r1v2_jax.train.schema import COMPLETION_DISTS


def completion_lengths(dist: str, mean_fraction: float, max_new: int, n: int) -> np.ndarray:
    """``n`` completion lengths (1..max_new): the distribution's quantiles at (i + 0.5) / n."""
    if dist not in COMPLETION_DISTS:
        raise ValueError(f"plan.completion_dist: expected one of {COMPLETION_DISTS}, got {dist!r}")
    q = (np.arange(n) + 0.5) / n
    mean = mean_fraction * max_new
    if dist == "max":
        lengths = np.full(n, float(max_new))
    elif dist == "uniform":
        lengths = q * 2 * mean
    else:
        lengths = -mean * np.log1p(-q)
    return np.clip(np.ceil(lengths), 1, max_new).astype(np.int64)


def kv_bytes_per_token(mc, tensor: int, dtype_bytes: int) -> int:
    """K and V of one position, all layers, on one chip of a ``tensor``-way mesh."""
    t = mc.text
    return t.num_layers * 2 * math.ceil(t.num_kv_heads / tensor) * t.resolved_head_dim * dtype_bytes


def decode_seconds(
    mc,
    *,
    lengths: np.ndarray,
    data: int,
    tensor: int,
    prompt_len: int,
    weight_bytes: int,
    kv_dtype_bytes: int,
    topo,
    bandwidth_util: float,
    collective_latency_s: float,
    mode: str = "ragged",
) -> dict:
    """Seconds to decode every row of ``lengths`` over ``data`` groups of ``tensor`` chips.

    ``mode``: ``ragged`` reads each live row's valid KV; ``bucket`` charges every slot the
    power-of-two page bucket of the longest live row (the XLA path the engine runs today);
    ``dense`` every slot its whole ``prompt_len + max`` cache (today's static sampler)."""
    rows = len(lengths)
    slots = -(-rows // data)  # rows per data group, the group's decode slots
    mine = np.sort(lengths)[::-1][::data][:slots]  # one group's rows: every data-th length
    steps = int(lengths.max())
    kv_tok = kv_bytes_per_token(mc, tensor, kv_dtype_bytes)
    s = np.arange(steps)
    live = (mine[None, :] > s[:, None]).sum(1)  # rows still decoding at each step
    ctx = prompt_len + s  # a live row's valid positions (prompt + tokens so far)
    if mode == "ragged":
        kv_bytes = live * ctx * kv_tok
    elif mode == "bucket":
        kv_bytes = slots * (2 ** np.ceil(np.log2(ctx))) * kv_tok
    elif mode == "dense":
        kv_bytes = np.full(steps, slots * (prompt_len + steps) * kv_tok)
    else:
        raise ValueError(f"mode: {mode!r}")
    bw = topo.hbm_bandwidth * bandwidth_util
    mem_s = (weight_bytes + kv_bytes) / bw
    flops_s = np.array([forward_flops(mc, slots, int(c)) for c in ctx]) / tensor / topo.peak_flops
    t = mc.text
    if tensor > 1:
        ici = topo.ici_bandwidth  # the chip's ICI, both ways (r1v2_jax.plan.topology)
        ar_bytes = 2 * (tensor - 1) / tensor * slots * t.hidden_size * 2
        comm_s = 2 * t.num_layers * (ar_bytes / ici + collective_latency_s)
    else:
        comm_s = 0.0
    per_step = np.maximum(mem_s, flops_s) + comm_s
    return {
        "seconds": float(per_step.sum()),
        "steps": steps,
        "slots": slots,
        "weight_seconds": float((weight_bytes / bw) * steps),
        "kv_seconds": float((kv_bytes / bw).sum()),
        "comm_seconds": float(comm_s * steps),
        "mean_live_rows": float(live.mean()),
        "kv_bytes_per_step": float(kv_bytes.mean()),
    }


def pool_bytes(
    mc, *, prompts: int, slots: int, prompt_len: int, max_new: int, page: int, tensor: int, dtype_bytes: int
):
    """The page pool of one data group: its prompts' pages once, every slot's worst case."""
    pages = prompts * -(-prompt_len // page) + slots * (-(-max_new // page) + 1) + 1  # page 0 reserved
    return pages * page * kv_bytes_per_token(mc, tensor, dtype_bytes)


def plan_engine(cfg, mc, devices, topo, *, resident_bytes: int, hbm: int) -> dict:
    """The paged engine over each sampler mesh ``(chips / t, 1, t)`` for t in
    ``plan.engine_tensor``: memory, decode time (ragged, as run today, and the dense sampler's
    under the same model), and the fastest that fits."""
    stage, pc = cfg.grpo, cfg.plan
    b, g, p, m = cfg.data.batch_size, stage.group_size, cfg.data.max_prompt_len, stage.max_new_tokens
    lengths = completion_lengths(pc.completion_dist, pc.completion_mean_fraction, m, b * g)
    kv_b = np.dtype(cfg.rollout_engine.kv_dtype or "bfloat16").itemsize
    page = cfg.rollout_engine.page_size
    options = []
    for t in pc.engine_tensor:
        if len(devices) % t or (b * g) % (len(devices) // t):
            options.append({"tensor": t, "skipped": f"{len(devices)} chips / tensor {t} does not split {b * g} rows"})
            continue
        data = len(devices) // t
        mesh = make_mesh(data, 1, t, devices=devices)
        weights = sum(gathered_bytes(x) for x in jax.tree.leaves(abstract_param_specs(mc, mesh)))
        slots = b * g // data
        pool = pool_bytes(
            mc, prompts=-(-b // data), slots=slots, prompt_len=p, max_new=m, page=page, tensor=t, dtype_bytes=kv_b
        )
        logits = slots * math.ceil(mc.text.vocab_size / t) * 4
        total = weights + pool + logits + resident_bytes
        common = dict(
            data=data,
            tensor=t,
            prompt_len=p,
            weight_bytes=weights,
            kv_dtype_bytes=kv_b,
            topo=topo,
            bandwidth_util=pc.assumed_bandwidth_util,
            collective_latency_s=pc.collective_latency_s,
        )
        options.append(
            {
                "tensor": t,
                "mesh": (data, 1, t),
                "weight_bytes": weights,
                "pool_bytes": pool,
                "logits_bytes": logits,
                "resident_bytes": resident_bytes,
                "total_bytes": total,
                "fits": total <= hbm,
                "ragged": decode_seconds(mc, lengths=lengths, mode="ragged", **common),
                "bucket": decode_seconds(mc, lengths=lengths, mode="bucket", **common),
                "dense": decode_seconds(mc, lengths=lengths, mode="dense", **common),
            }
        )
    fitting = [o for o in options if o.get("fits")]
    best = min(fitting, key=lambda o: o["ragged"]["seconds"]) if fitting else None
    return {
        "completion_dist": pc.completion_dist,
        "completion_mean_fraction": pc.completion_mean_fraction,
        "mean_length": float(lengths.mean()),
        "truncated_share": float((lengths >= m).mean()),
        "page_size": page,
        "kv_dtype_bytes": kv_b,
        "collective_latency_s": pc.collective_latency_s,
        "options": options,
        "best": best["tensor"] if best else None,
        "seconds": best["ragged"]["seconds"] if best else float("nan"),
    }


def format_engine(e: dict, dense_seconds: float, gib: int) -> list[str]:
    """The engine's lines of ``r1v2 plan``'s report."""
    lines = [
        f"  paged engine (analytic; completions {e['completion_dist']} with mean "
        f"{e['completion_mean_fraction']:.2f} x max: mean {e['mean_length']:.0f} tokens, "
        f"{e['truncated_share']:.1%} at the cap; pages of {e['page_size']}, KV {8 * e['kv_dtype_bytes']}-bit; "
        f"{e['collective_latency_s'] * 1e6:.0f} us per all-reduce)",
        f"    {'sampler mesh':<14} {'weights':>8} {'pool':>7} {'resident':>8} {'total':>7} GiB   "
        f"{'ragged s':>9} {'(weights / KV / comm)':>22} {'as run today s':>14} {'dense s':>8}",
    ]
    for o in e["options"]:
        if "skipped" in o:
            lines.append(f"    tensor {o['tensor']:<7} skipped: {o['skipped']}")
            continue
        r = o["ragged"]
        lines.append(
            f"    {'x'.join(map(str, o['mesh'])):<14} {o['weight_bytes'] / gib:8.2f} {o['pool_bytes'] / gib:7.2f} "
            f"{o['resident_bytes'] / gib:8.2f} {o['total_bytes'] / gib:7.2f} {'fits' if o['fits'] else 'OVER'}  "
            f"{r['seconds']:9.1f} {r['weight_seconds']:8.1f} / {r['kv_seconds']:5.1f} / {r['comm_seconds']:5.1f} "
            f"{o['bucket']['seconds']:14.1f} {o['dense']['seconds']:8.1f}"
        )
    if e["best"] is None:
        lines.append("    no sampler mesh fits")
    else:
        lines.append(
            f"    fastest that fits: tensor {e['best']}: rollout {e['seconds']:.1f} s against the dense "
            f"sampler's {dense_seconds:.1f} s as planned above ({e['seconds'] / dense_seconds:.2f}x)"
        )
    return lines
