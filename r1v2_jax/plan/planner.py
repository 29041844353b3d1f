"""``r1v2 plan``: compile a config's programs ahead of time for a TPU topology, on any machine
(libtpu from PyPI provides the compiler), and report per-chip memory, FLOPs and step time.

    r1v2 plan --config configs/grpo_38b.py --topology v5p-128

Programs: the train step of the config's RL stage (GRPO, or MPO when the config has no GRPO
stage) and, for GRPO, the sampler's prefill (``batch_size`` prompts) and decode loop
(``batch_size x group_size`` rows, ``max_new_tokens``). The learner uses ``plan.mesh`` (empty:
the run's ``mesh``), the sampler ``plan.sampler_mesh`` (empty: the run's ``sampler_mesh``, or
the learner's mesh), both over the same chips.

Per program: XLA's memory analysis per chip (arguments, temporaries, outputs) against the
chip's HBM. The sampler runs while the optimizer state stays in HBM, so its programs are
charged that resident state too. Step time is a roofline estimate, stated as such: the train
step and prefill at ``plan.assumed_mfu`` of peak FLOPs (analytic FLOPs: XLA's cost analysis
counts a scanned layer body once), each decode step as the larger of its FLOPs at peak and
its HBM traffic (the chip's tensor shard of every weight, all-gathered over FSDP, + its rows'
whole KV cache, read once per token) at
``plan.assumed_bandwidth_util`` of the chip's bandwidth. Beside it, XLA's own estimate
(its TPU cost model's ``optimal_seconds``) with every loop counted by its trip count (see
:func:`r1v2_jax.plan.programs.xla_estimate`; ``plan.xla_estimate=False`` skips the extra compiles), and the MFU
each implies. A config that does not fit exits
non-zero, naming the largest buffers; a micro-batch that does not divide over the batch axes
is reported.

When ``grpo.reward_model.kind`` is ``ours`` or ``skywork_vl``, the reward model's scoring
program (one forward over the rollout batch, on the sampler mesh) is compiled and reported
too (:mod:`r1v2_jax.plan.reward_model`); its roofline time is part of the step.

With ``grpo.rollout_ahead=1`` the report adds the overlapped step on a split of the slice
(:mod:`r1v2_jax.plan.overlap`) beside the sequential one.

Not covered: multi-slice (DCN) topologies, and, in the sequential step, the cost of resharding
parameters between different learner and sampler meshes.
"""

from __future__ import annotations

import dataclasses

import jax

from r1v2_jax.model.attention import resolve_impl
from r1v2_jax.parallel.multihost import batch_shards
from r1v2_jax.parallel.sharding import make_mesh, use_mesh_rules
from r1v2_jax.plan.engine import format_engine, plan_engine
from r1v2_jax.plan.flops import forward_flops, kernel_flops, needed_train_flops, train_step_flops
from r1v2_jax.plan.overlap import format_overlap, overlap_plan
from r1v2_jax.plan.programs import (
    Job,
    compile_program,
    cost_of,
    gathered_bytes,
    memory_report,
    no_compile_cache_writes,
    per_chip_bytes,
    sampler_programs,
    shard_bytes,
    train_program,
    xla_estimate,
)
from r1v2_jax.plan.reward_model import reward_model_program
from r1v2_jax.plan.topology import GiB, devices_for, parse_topology
from r1v2_jax.train.experiment import model_config_from
from r1v2_jax.train.schema import from_config_dict, mesh_for


def plan(cfg, topology: str, hbm_bytes: int | None = None) -> dict:
    """Compile the RL stage's programs of ``cfg`` (an Experiment, or a ConfigDict checked into
    one) for ``topology`` and report."""

    if not dataclasses.is_dataclass(cfg):
        cfg = from_config_dict(cfg)
    with no_compile_cache_writes():
        return _plan(cfg, topology, hbm_bytes)


def _plan(cfg, topology: str, hbm_bytes: int | None) -> dict:
    # Longer than 60 lines: one report assembled field by field (train step, prefill, decode,
    # XLA's estimate, the totals); each block reads the figures the blocks above computed.
    topo = parse_topology(topology)
    hbm = hbm_bytes or topo.hbm_bytes
    devices = devices_for(topo)
    algo = "grpo" if "grpo" in cfg.stages else "mpo" if "mpo" in cfg.stages else None
    if algo is None:
        raise ValueError(f"stages: {tuple(cfg.stages)} has no RL stage (grpo or mpo) to plan")
    stage = getattr(cfg, algo)
    job = Job(cfg, algo, cfg.plan.tiles_per_sample)
    remat = cfg.plan.remat_policy or cfg.model.remat_policy or "full"
    mc = model_config_from(cfg).replace(remat_policy=remat, scan_layers=True)
    key = "plan.mesh" if cfg.plan.mesh else "mesh"
    shape = mesh_for(cfg.plan if cfg.plan.mesh else cfg, key.split(".")[-1], len(devices)) or (1, len(devices), 1)
    mesh = make_mesh(*shape, devices=devices)
    s_src = cfg.plan if cfg.plan.sampler_mesh else cfg
    s_shape = mesh_for(s_src, "sampler_mesh", len(devices))
    sampler_mesh = make_mesh(*s_shape, devices=devices) if s_shape else mesh
    shards = batch_shards(mesh)
    n_micro = stage.micro_batches
    peak_s = topo.chips * topo.peak_flops
    programs, notes = {}, []

    if algo == "grpo":
        n = cfg.data.batch_size * stage.group_size
        t = cfg.data.max_prompt_len + stage.max_new_tokens
        flops, tokens = train_step_flops(mc, n * t, t), n * t
    else:
        n = cfg.data.batch_size
        t = cfg.data.max_prompt_len + cfg.data.max_completion_len
        # chosen + rejected through the policy (fwd + bwd), the reference (fwd) and the policy's
        # forward-only pass for BCO's δ (r1v2_jax.train.steps.mpo_sequence_logps)
        flops, tokens = train_step_flops(mc, 2 * n * t, t, forwards=3), 2 * n * t
    if (n // n_micro) % shards or n % n_micro:
        notes.append(
            f"{algo} micro-batch: {n} rows / {n_micro} micro-batches = {n / n_micro:g} rows over "
            f"data x fsdp = {shards}: not a whole number of rows per device (XLA pads or replicates)"
        )
    lowered, state, ref = train_program(job, mc, mesh, n, n_micro)
    compiled = compile_program(lowered)
    cost = cost_of(compiled)
    with use_mesh_rules(mesh):
        impl = resolve_impl(mc.attention_impl, t)
    programs["train"] = {
        **memory_report(compiled, hbm),
        "flops": flops,
        "tokens": tokens,
        "seconds": flops / (peak_s * cfg.plan.assumed_mfu),
        "xla_flops_scan_body_once": float(cost.get("flops", float("nan"))),
        "attention_impl": impl,
        "logprob_chunk_size": mc.logprob_chunk_size,
        "kernel_flops": kernel_flops(job, mc, n, t) if impl == "splash" else 0.0,
        # what the step computes by that count when the LLM is frozen (no weight gradients for it)
        "needed_flops": needed_train_flops(mc, flops, tokens, stage.optim.trainable),
    }
    # the same step as before issue 15 (materialised attention, whole-sequence logits), side by side
    before = mc.replace(attention_impl="xla", logprob_chunk_size=t)
    baseline = memory_report(compile_program(train_program(job, before, mesh, n, n_micro)[0]), hbm)
    opt_bytes = per_chip_bytes(state.opt_state) + (per_chip_bytes(ref) if ref is not None else 0)
    if sampler_mesh is not mesh:  # the learner's copy of the parameters stays too
        opt_bytes += per_chip_bytes(state.params)

    if algo == "grpo":
        pre, (dec,), s_params, cache = sampler_programs(job, mc, sampler_mesh)
        b, p, m = cfg.data.batch_size, cfg.data.max_prompt_len, stage.max_new_tokens
        pre_f = forward_flops(mc, b * p, p)
        programs["prefill"] = {
            **memory_report(pre, hbm, opt_bytes),
            "flops": pre_f,
            "tokens": b * p,
            "seconds": pre_f / (peak_s * cfg.plan.assumed_mfu),
        }
        rows = b * stage.group_size
        # each token step reads every weight of the chip's tensor shard (after FSDP all-gathers)
        # and its rows' whole KV cache
        per_token_bytes = sum(gathered_bytes(x) for x in jax.tree.leaves(s_params)) + per_chip_bytes(cache)
        per_token_s = max(
            per_token_bytes / (topo.hbm_bandwidth * cfg.plan.assumed_bandwidth_util),
            forward_flops(mc, rows, p + m) / peak_s,
        )
        programs["decode"] = {
            **memory_report(dec, hbm, opt_bytes),
            "flops": forward_flops(mc, rows, p + m) * m,
            "tokens": rows * m,
            "seconds": per_token_s * m,
            "bytes_per_token_step": per_token_bytes,
        }
        # the paged engine on a sampler mesh of its own over the same chips: the learner's whole
        # state (parameters, optimizer, SSB, reference) stays resident while it decodes
        engine_resident = per_chip_bytes(state) + (per_chip_bytes(ref) if ref is not None else 0)
        engine = plan_engine(cfg, mc, devices, topo, resident_bytes=engine_resident, hbm=hbm)
    else:
        engine = None
    rm = stage.reward_model if algo == "grpo" else None
    if rm is not None and rm.kind in ("ours", "skywork_vl"):
        rows = cfg.data.batch_size * stage.group_size
        seq = cfg.data.max_prompt_len + stage.max_new_tokens
        rm_prog, info, _ = reward_model_program(job, rm, mc, sampler_mesh, rows, seq)
        # the optimizer state and the sampler's policy weights stay in HBM while the RM scores
        programs["reward_model"] = {
            **memory_report(rm_prog, hbm, opt_bytes + per_chip_bytes(s_params)),
            **info,
            "tokens": rows * info["seq_len"],
            "seconds": info["flops"] / (peak_s * cfg.plan.assumed_mfu),
        }
        if cfg.plan.xla_estimate:
            notes.append("XLA's step-time estimate leaves the reward model out (its roofline time is in the step)")
    elif rm is not None and rm.kind == "remote":
        notes.append("reward model: remote (scored by the server; nothing on these chips)")
    if cfg.plan.xla_estimate:
        for name, s in xla_estimate(job, mc, mesh, sampler_mesh, n_micro, n).items():
            programs[name]["xla_seconds"] = s
        # XLA's estimate leaves the Pallas kernels out: add their FLOPs at the stated efficiency
        tr = programs["train"]
        tr["kernel_seconds"] = tr["kernel_flops"] / (peak_s * cfg.plan.kernel_efficiency)
        tr["xla_seconds_outside_kernels"] = tr["xla_seconds"]
        tr["xla_seconds"] += tr["kernel_seconds"]
        tr["xla_mfu"] = tr["flops"] / (tr["xla_seconds"] * peak_s)
        tr["xla_mfu_needed"] = tr["needed_flops"] / (tr["xla_seconds"] * peak_s)
    leaves = []
    for kp, x in jax.tree_util.tree_flatten_with_path((state.params, state.opt_state))[0]:
        leaves.append((shard_bytes(x), jax.tree_util.keystr(kp)))
    leaves.sort(reverse=True)
    peak = max(p_["total_bytes"] for p_ in programs.values())
    step_s = sum(p_["seconds"] for p_ in programs.values())
    total_flops = sum(p_["flops"] for p_ in programs.values())
    xla_s = sum(p_.get("xla_seconds", 0.0) for p_ in programs.values()) if cfg.plan.xla_estimate else None
    overlap = None
    if algo == "grpo" and stage.rollout_ahead:
        rollout_s = programs["prefill"]["seconds"] + programs["decode"]["seconds"]
        overlap = overlap_plan(cfg, job, mc, topo, devices, hbm, step_s, programs["train"]["flops"], rollout_s)
    return {
        "overlap": overlap,
        "algorithm": algo,
        "trainable": stage.optim.trainable,
        "remat_policy": remat,
        "topology": topo.name,
        "topology_name": topo.topology_name,
        "chips": len(devices),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "sampler_mesh": {k: int(v) for k, v in sampler_mesh.shape.items()},
        "hbm_per_chip": hbm,
        "programs": programs,
        "peak_bytes": peak,
        "fits": all(p_["fits"] for p_ in programs.values()),
        "step_seconds": step_s,
        "flops_per_step": total_flops,
        "mfu": total_flops / (step_s * peak_s),
        "xla_step_seconds": xla_s,
        "xla_mfu": total_flops / (xla_s * peak_s) if xla_s else None,
        "assumed_mfu": cfg.plan.assumed_mfu,
        "assumed_bandwidth_util": cfg.plan.assumed_bandwidth_util,
        "largest_buffers": [(name, b_) for b_, name in leaves[:5]],
        "notes": notes,
        "baseline_train": baseline,
        "kernel_efficiency": cfg.plan.kernel_efficiency,
        "engine": engine,
        # today's step with the paged engine's rollout in place of the dense decode loop
        "engine_step_seconds": step_s - programs["decode"]["seconds"] + engine["seconds"] if engine else None,
        # kept for scripts reading the first version's fields
        "argument_bytes": programs["train"]["argument_bytes"],
        "temp_bytes": programs["train"]["temp_bytes"],
        "total_bytes": peak,
    }


def _secs(x) -> str:
    """Seconds for the report: "-" when not estimated, "n/a" when a program could not be compiled."""
    return "-" if x is None else "n/a" if x != x else f"{x:.2f}" if x >= 0.01 else f"{x:.1e}"


def format_plan(r: dict) -> str:
    g = lambda b: f"{b / GiB:7.2f}"  # noqa: E731
    mesh = lambda m: "x".join(f"{k}={v}" for k, v in m.items())  # noqa: E731
    lines = [
        f"plan: {r['algorithm'].upper()} (trainable: {r['trainable']}, remat: {r['remat_policy']}) "
        f"on {r['topology']} "
        f"({r['topology_name']}, {r['chips']} chips); learner mesh {mesh(r['mesh'])}"
        + (f", sampler mesh {mesh(r['sampler_mesh'])}" if r["sampler_mesh"] != r["mesh"] else ""),
        f"  per chip, GiB   {'args':>7} {'temps':>7} {'outs':>7} {'alias':>7} {'resident':>8} {'total':>7}"
        f"  of {r['hbm_per_chip'] / GiB:.0f}  {'roofline s':>10} {'XLA s':>9}",
    ]
    for name, p in r["programs"].items():
        lines.append(
            f"  {name:<14} {g(p['argument_bytes'])} {g(p['temp_bytes'])} {g(p['output_bytes'])} "
            f"{g(p['alias_bytes'])} {g(p['resident_bytes']):>8} {g(p['total_bytes'])}  "
            f"{'fits ' if p['fits'] else 'OVER '} {_secs(p['seconds']):>10} {_secs(p.get('xla_seconds')):>9}"
        )
    lines += [
        f"  peak {r['peak_bytes'] / GiB:.2f} GiB per chip -> {'fits' if r['fits'] else 'DOES NOT FIT'}",
        f"  step time (roofline: train/prefill at {r['assumed_mfu']:.0%} MFU, decode at "
        f"{r['assumed_bandwidth_util']:.0%} of HBM bandwidth): {r['step_seconds']:.1f} s, "
        f"{r['flops_per_step']:.3e} FLOPs -> MFU {r['mfu']:.1%}",
    ]
    tr, base = r["programs"]["train"], r.get("baseline_train")
    if base is not None:
        lines.append(
            f"  train program, before -> now: temps {base['temp_bytes'] / GiB:.2f} -> "
            f"{tr['temp_bytes'] / GiB:.2f} GiB, total {base['total_bytes'] / GiB:.2f} -> "
            f"{tr['total_bytes'] / GiB:.2f} GiB per chip "
            f"(before: xla attention, whole-sequence logits; now: {tr['attention_impl']} attention, "
            f"log-probs in chunks of {tr['logprob_chunk_size']})"
        )
    if "kernel_seconds" in tr:
        lines.append(
            f"  train step (XLA outside the kernels {_secs(tr['xla_seconds_outside_kernels'])} s + "
            f"{tr['kernel_flops']:.3e} kernel FLOPs at {r['kernel_efficiency']:.0%} of peak "
            f"{_secs(tr['kernel_seconds'])} s): {_secs(tr['xla_seconds'])} s -> train MFU {tr['xla_mfu']:.1%}"
            " (model FLOPs: forward + backward = 3x forward)"
            + (
                f"; {tr['xla_mfu_needed']:.1%} of the FLOPs this step computes ({r['trainable']}: the frozen "
                "LLM's weight gradients are not)"
                if tr["needed_flops"] != tr["flops"]
                else ""
            )
        )
    if r["xla_step_seconds"] is not None:
        lines.append(
            f"  step time (XLA's cost model, loops counted by trip count): {_secs(r['xla_step_seconds'])} s"
            + (f" -> MFU {r['xla_mfu']:.1%}" if r["xla_mfu"] == r["xla_mfu"] else "")
        )
    if r.get("engine"):
        lines += format_engine(r["engine"], r["programs"]["decode"]["seconds"], GiB)
        lines.append(
            f"  step time with the paged engine's rollout (roofline): {r['engine_step_seconds']:.1f} s "
            f"against {r['step_seconds']:.1f} s"
        )
    if "reward_model" in r["programs"]:
        p = r["programs"]["reward_model"]
        lines.append(
            f"  reward model ({p['kind']}): one forward over {p['rows']} rollouts of {p['seq_len']} tokens "
            f"({p['image_tokens']} image tokens each), {p['flops']:.3e} FLOPs, on the sampler mesh"
        )
    if r.get("overlap"):
        lines += format_overlap(r["overlap"])
    lines.append("  largest per-chip parameter / optimizer buffers:")
    lines += [f"    {b / GiB:8.3f} GiB  {name}" for name, b in r["largest_buffers"]]
    lines += [f"  note: {n}" for n in r["notes"]]
    lines += [
        f"  {name}: the TPU compiler ran out of HBM: {p['compiler_error']}"
        for name, p in r["programs"].items()
        if "compiler_error" in p
    ]
    return "\n".join(lines)
