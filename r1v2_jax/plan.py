"""``r1v2 plan``: compile a config's GRPO train step ahead of time for a TPU topology, on any
machine (libtpu from PyPI provides the compiler), and report per-chip memory and FLOPs.

    r1v2 plan --config configs/grpo_38b.py --topology v5p-128

The report: XLA's memory analysis per chip (arguments, temporaries, outputs) against the
chip's HBM, analytic FLOPs per step (XLA's cost analysis counts a scanned layer body once,
so it is not used for FLOPs), XLA's own optimal-time estimate (same caveat), the
compute-bound step time at peak, and the largest per-chip parameter/optimizer buffers. A
config that does not fit exits non-zero.

Not yet covered (next steps): the sampler's prefill/decode programs, separate learner and
sampler meshes, and multi-slice topologies.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

GiB = 1024**3
# name -> (topology_name for get_topology_desc, HBM bytes per chip, peak bf16 FLOP/s per chip)
_FAMILIES = {
    "v4": (32 * GiB, 275e12, 3, 2),  # (hbm, peak, dims, cores per chip in the slice name)
    "v5p": (95 * GiB, 459e12, 3, 2),
    "v5e": (16 * GiB, 197e12, 2, 1),
    "v6e": (32 * GiB, 918e12, 2, 1),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    topology_name: str
    chips: int
    hbm_bytes: int
    peak_flops: float


def parse_topology(name: str) -> Topology:
    """``v5p-128`` (128 cores = 64 chips, 4x4x4), ``v4-32``, ``v5e-16``, ``v6e-64``, or an explicit
    ``v5p:4x4x4``."""
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip())
    if not m:
        raise ValueError(f"topology {name!r}: expected e.g. v5p-128, v4-32, v5e-16, v6e-64 or v5p:4x4x4")
    fam, count, dims = m.group(1), m.group(2), m.group(3)
    hbm, peak, ndim, cores = _FAMILIES[fam]
    if dims:
        shape = [int(x) for x in dims.split("x")]
        if len(shape) != ndim:
            raise ValueError(f"topology {name!r}: {fam} slices are {ndim}-D")
    else:
        chips = int(count) // cores
        if chips < 1 or chips & (chips - 1):
            raise ValueError(f"topology {name!r}: need a power-of-two chip count, got {chips}")
        shape = [1] * ndim
        i = 0
        while int(np.prod(shape)) < chips:  # grow the dims round-robin: 2x2x1, 2x2x2, 2x2x4 ...
            shape[i % ndim] *= 2
            i += 1
        if ndim == 2:
            shape = sorted(shape, reverse=True)
    topo = f"{fam}:{'x'.join(map(str, shape))}"
    return Topology(name, topo, int(np.prod(shape)), hbm, peak)


def _devices(topology: Topology):
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=topology.topology_name).devices
    except Exception as e:  # noqa: BLE001 - no libtpu, or an unknown topology
        raise RuntimeError(f"cannot describe TPU topology {topology.topology_name} ({e}); "
                           "install the compiler with: pip install \"jax[tpu]==<jax version>\"") from None


def train_step_flops(mc, tokens: int, seq: int) -> float:
    """Analytic FLOPs of one training step over ``tokens`` LLM tokens of sequences of length
    ``seq``: 3 x (2 x matmul parameters x tokens + attention 4 x seq x heads x head_dim per token
    and layer). The vision tower is not counted (text FLOPs dominate for long reasoning)."""
    t = mc.text
    hd = t.resolved_head_dim
    per_layer = (t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * hd + t.num_heads * hd * t.hidden_size
                 + 3 * t.hidden_size * t.intermediate_size)
    matmul = t.num_layers * per_layer + t.hidden_size * t.vocab_size
    fwd = 2 * matmul * tokens + t.num_layers * tokens * 4 * seq * t.num_heads * hd
    return 3.0 * fwd


def plan(cfg, topology: str, hbm_bytes: int | None = None) -> dict:
    """Compile the GRPO train step of ``cfg`` (a run config) for ``topology`` and report."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from r1v2_jax.experiments import model_config_from
    from r1v2_jax.model import R1V2, abstract_params, param_shardings
    from r1v2_jax.rl.losses import PolicyLossConfig
    from r1v2_jax.sharding import make_mesh
    from r1v2_jax.train.state import OptimConfig, TrainState, make_optimizer
    from r1v2_jax.train.steps import make_train_step

    topo = parse_topology(topology)
    hbm = hbm_bytes or topo.hbm_bytes
    devices = _devices(topo)
    mc = model_config_from(cfg).replace(remat_policy=cfg.plan.remat_policy, scan_layers=True)
    data, fsdp, tensor = cfg.plan.mesh
    mesh = make_mesh(data, fsdp, tensor, devices=devices)
    g = cfg.grpo
    p_sh = param_shardings(mc, mesh)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params(mc, boxed=False), p_sh)
    opt = make_optimizer(OptimConfig(lr=g.lr, trainable=g.trainable), params)
    rep = NamedSharding(mesh, P())
    opt_out = jax.jit(opt.init).lower(params).compile()  # XLA propagates the parameter shardings
    on_mesh = set(mesh.devices.flat)
    opt_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s if set(s.device_set) == on_mesh else rep),
        jax.eval_shape(opt.init, params), opt_out.output_shardings)
    scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=rep)  # noqa: E731
    state = TrainState(step=scalar(jnp.int32), params=params, opt_state=opt_state,
                       rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep), bco_delta=scalar(jnp.float32),
                       skipped=scalar(jnp.int32), ssb=None)
    n = cfg.data.batch_size * g.group_size
    t = cfg.data.max_prompt_len + g.max_new_tokens
    row = NamedSharding(mesh, P(("data", "fsdp")))
    batch = {"tokens": jax.ShapeDtypeStruct((n, t), jnp.int32, sharding=row),
             "attention_mask": jax.ShapeDtypeStruct((n, t), bool, sharding=row),
             "completion_mask": jax.ShapeDtypeStruct((n, t), bool, sharding=row),
             "old_logp": jax.ShapeDtypeStruct((n, t), jnp.float32, sharding=row),
             "advantages": jax.ShapeDtypeStruct((n,), jnp.float32, sharding=row)}
    if cfg.plan.tiles_per_sample:
        s = mc.tile_size
        batch["pixel_values"] = jax.ShapeDtypeStruct((n, cfg.plan.tiles_per_sample, 3, s, s), jnp.bfloat16
                                                     if mc.dtype == "bfloat16" else jnp.float32, sharding=row)
    step = make_train_step("grpo", R1V2(mc), opt, n_micro=g.micro_batches,
                           policy_cfg=PolicyLossConfig(clip_low=g.clip_low, clip_high=g.clip_high,
                                                       aggregation=g.aggregation, norm_tokens=g.max_new_tokens),
                           mesh=mesh)
    compiled = step.lower(state, batch, None).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    args, temps, outs, alias = (mem.argument_size_in_bytes, mem.temp_size_in_bytes, mem.output_size_in_bytes,
                                mem.alias_size_in_bytes)
    total = args + temps + outs - alias
    flops = train_step_flops(mc, n * t, t)
    leaves = []
    for kp, x in jax.tree_util.tree_flatten_with_path((params, opt_state))[0]:
        shard = x.sharding.shard_shape(x.shape) if hasattr(x.sharding, "shard_shape") else x.shape
        leaves.append((int(np.prod(shard)) * np.dtype(x.dtype).itemsize, jax.tree_util.keystr(kp)))
    leaves.sort(reverse=True)
    return {
        "topology": topo.name, "topology_name": topo.topology_name, "chips": len(devices),
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "hbm_per_chip": hbm,
        "argument_bytes": args, "temp_bytes": temps, "output_bytes": outs, "alias_bytes": alias,
        "total_bytes": total, "fits": total <= hbm, "flops_per_step": flops,
        "xla_flops_scan_body_once": float(cost.get("flops", float("nan"))),
        "xla_optimal_seconds": float(cost.get("optimal_seconds", float("nan"))),
        "compute_bound_seconds": flops / (len(devices) * topo.peak_flops),
        "largest_buffers": [(name, b) for b, name in leaves[:5]],
        "tokens_per_step": n * t,
    }


def format_plan(r: dict) -> str:
    g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    lines = [f"plan: GRPO train step on {r['topology']} ({r['topology_name']}, {r['chips']} chips), mesh "
             f"data={r['mesh']['data']} fsdp={r['mesh']['fsdp']} tensor={r['mesh']['tensor']}",
             f"  arguments   {g(r['argument_bytes'])} per chip",
             f"  temporaries {g(r['temp_bytes'])}",
             f"  outputs     {g(r['output_bytes'])} (aliased {g(r['alias_bytes'])})",
             f"  total       {g(r['total_bytes'])} of {g(r['hbm_per_chip'])} HBM -> "
             f"{'fits' if r['fits'] else 'DOES NOT FIT'}",
             f"  FLOPs/step  {r['flops_per_step']:.3e} (analytic; {r['tokens_per_step']} tokens)",
             f"  compute-bound step time at peak: {r['compute_bound_seconds']:.2f} s "
             f"(XLA optimal_seconds {r['xla_optimal_seconds']:.3g} s counts each scan body once)",
             "  largest per-chip buffers:"]
    lines += [f"    {b / GiB:8.3f} GiB  {name}" for name, b in r["largest_buffers"]]
    return "\n".join(lines)
