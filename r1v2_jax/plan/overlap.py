"""The overlapped GRPO step (``grpo.rollout_ahead=1``) in a plan: the slice split into the
learner's chips and the sampler's, a few splits searched, each step costed as

    max(train step on the learner's chips, rollout on the sampler's chips) + weight push

beside the sequential step on the whole slice (the plan's own figures). Train step and
prefill at ``plan.assumed_mfu`` of the chips' peak, decode as the larger of its FLOPs at peak
and its HBM traffic per token step (the chip's gathered weight shard + its rows' KV cache, read
once) at ``plan.assumed_bandwidth_util``, as the sequential roofline. The weight push moves the
trainable parameters' bytes (``grpo.optim.trainable``: what training pushes,
:class:`r1v2_jax.train.stages.overlap.SamplerWeights`) at ``plan.weight_push_bandwidth`` bytes/s,
all of them through one chip's link (stated, conservative: ICI spreads it over many). The
fastest split by that estimate whose three programs (train on its learner mesh, prefill and
decode on its sampler mesh) compile within HBM is proposed. Host-side reward scoring, which
runs while the update computes, is not counted."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from r1v2_jax.model.vlm import abstract_params
from r1v2_jax.parallel.multihost import batch_shards
from r1v2_jax.parallel.sharding import MESH_AXES
from r1v2_jax.plan.flops import forward_flops
from r1v2_jax.plan.programs import (
    Job,
    compile_program,
    gathered_bytes,
    memory_report,
    per_chip_bytes,
    sampler_programs,
    sampler_shapes,
    train_program,
)
from r1v2_jax.train.schema import ExperimentError, mesh_for
from r1v2_jax.train.state import trainable_labels


def candidate_splits(cfg, chips: int) -> list[int]:
    """Sampler chip counts to try: ``sampler_devices`` when set, else a quarter, half and three quarters."""
    if cfg.sampler_devices:
        return [cfg.sampler_devices]
    return sorted({k for k in (chips // 4, chips // 2, 3 * chips // 4) if 0 < k < chips})


def pushed_bytes(mc, trainable: str) -> tuple[int, int]:
    """(bytes of the trainable parameters, bytes of all parameters)."""
    params = abstract_params(mc, boxed=False)
    labels = trainable_labels(params, trainable)
    size = lambda x: int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize  # noqa: E731
    leaves = zip(jax.tree.leaves(labels), jax.tree.leaves(params))
    train = sum(size(x) for lab, x in leaves if lab == "train")
    return train, sum(size(x) for x in jax.tree.leaves(params))


def _mesh(shape, devices) -> Mesh:
    """A mesh over part of a slice, in the slice's device order (a part need not be a whole
    torus, which ``jax.make_mesh`` asks for)."""
    return Mesh(np.asarray(devices, object).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def push_bandwidth(pc, topo) -> float:
    """Bytes/s of the learner -> sampler weight push: ``plan.weight_push_bandwidth``, or (0)
    one ICI link one way of the topology's chips (v5p: 600 GB/s over 6 links, both ways: 50 GB/s)."""
    return pc.weight_push_bandwidth or topo.link_one_way


def split_estimate(cfg, job: Job, mc, topo, devices, k: int, train_flops: float) -> dict | None:
    """The roofline of one split (``k`` sampler chips, the last ones), None when the run's
    meshes do not divide its sides or a side's batch axes do not divide its rows (the step's
    rollouts on the learner, the prompts on the sampler)."""
    n, stage, pc = len(devices), cfg.grpo, cfg.plan
    try:
        l_shape = mesh_for(cfg, "mesh", n - k) or (1, n - k, 1)
        s_shape = mesh_for(cfg, "sampler_mesh", k) or (k, 1, 1)
    except ExperimentError:
        return None
    l_mesh, s_mesh = _mesh(l_shape, devices[: n - k]), _mesh(s_shape, devices[n - k :])
    b, p, m = cfg.data.batch_size, cfg.data.max_prompt_len, stage.max_new_tokens
    rows = b * stage.group_size
    if rows % batch_shards(l_mesh) or b % batch_shards(s_mesh):  # the rows must split over each side's batch axes
        return None
    s_params, cache = sampler_shapes(job, mc, s_mesh)
    per_token_bytes = sum(gathered_bytes(x) for x in jax.tree.leaves(s_params)) + per_chip_bytes(cache)
    per_token_s = max(
        per_token_bytes / (topo.hbm_bandwidth * pc.assumed_bandwidth_util),
        forward_flops(mc, rows, p + m) / (k * topo.peak_flops),
    )
    train_s = train_flops / ((n - k) * topo.peak_flops * pc.assumed_mfu)
    rollout_s = forward_flops(mc, b * p, p) / (k * topo.peak_flops * pc.assumed_mfu) + per_token_s * m
    push, full = pushed_bytes(mc, stage.optim.trainable)
    bw = push_bandwidth(pc, topo)
    push_s = push / bw
    return {
        "sampler_chips": k,
        "learner_chips": n - k,
        "mesh": {a: int(v) for a, v in l_mesh.shape.items()},
        "sampler_mesh": {a: int(v) for a, v in s_mesh.shape.items()},
        "train_seconds": train_s,
        "rollout_seconds": rollout_s,
        "push_bytes": push,
        "push_seconds": push_s,
        "full_push_seconds": full / bw,
        "step_seconds": max(train_s, rollout_s) + push_s,
        "_meshes": (l_mesh, s_mesh),
    }


def ratio_bound(cfg, topo, n: int, sequential_s: float, train_flops: float, rollout_n: float, ks: list[int]):
    """The smallest overlapped / sequential ratio any of the splits ``ks`` (sampler chips) could
    reach, and its split: the train step at a fixed MFU takes ``n / (n - k)`` times as long on the
    learner's ``n - k`` chips, and a rollout (prefill + decode, ``rollout_n`` on all ``n`` chips in
    the sequential plan) on ``k`` chips is no faster than on all ``n`` (in the
    roofline each chip reads no fewer weight bytes and more KV bytes per token step), so the step is
    at least max(train_n * n / (n - k), rollout_n): at best 2/3 of the sequential step when half
    the chips learn, whatever the rollout costs."""
    train_n = train_flops / (n * topo.peak_flops * cfg.plan.assumed_mfu)
    return min((max(train_n * n / (n - k), rollout_n) / sequential_s, k) for k in ks)


def overlap_plan(
    cfg, job: Job, mc, topo, devices, hbm: int, sequential_s: float, train_flops: float, rollout_s: float
) -> dict:
    """The splits' estimates (fastest first) and the proposed one: the fastest whose programs
    fit, each of its programs' memory report included."""
    splits = [
        e
        for k in candidate_splits(cfg, len(devices))
        if (e := split_estimate(cfg, job, mc, topo, devices, k, train_flops))
    ]
    if not splits:
        raise ExperimentError(
            f"sampler_devices: no split of the {len(devices)} chips divides mesh {tuple(cfg.mesh)} / sampler_mesh "
            f"{tuple(cfg.sampler_mesh)} and the batch on both sides; set sampler_devices"
        )
    splits.sort(key=lambda e: e["step_seconds"])
    n_rows = cfg.data.batch_size * cfg.grpo.group_size
    chosen = None
    for e in splits:
        l_mesh, s_mesh = e.pop("_meshes")
        if chosen is not None:
            continue
        train = memory_report(compile_program(train_program(job, mc, l_mesh, n_rows, cfg.grpo.micro_batches)[0]), hbm)
        pre, (dec,), _, _ = sampler_programs(job, mc, s_mesh)
        e["programs"] = {"train": train, "prefill": memory_report(pre, hbm), "decode": memory_report(dec, hbm)}
        e["fits"] = all(p["fits"] for p in e["programs"].values())
        if e["fits"]:
            chosen = e
    for e in splits:
        e.pop("_meshes", None)
    best = chosen or splits[0]
    ks = [e["sampler_chips"] for e in splits]
    bound, bound_k = ratio_bound(cfg, topo, len(devices), sequential_s, train_flops, rollout_s, ks)
    return {
        "ratio_bound": bound,
        "ratio_bound_split": bound_k,
        "splits": splits,
        "proposed": best,
        "fits": chosen is not None,
        "sequential_seconds": sequential_s,
        "overlapped_seconds": best["step_seconds"],
        "ratio": best["step_seconds"] / sequential_s,
        "weight_push_bandwidth": push_bandwidth(cfg.plan, topo),
    }


def format_overlap(o: dict) -> list[str]:
    mesh = lambda m: "x".join(f"{k}={v}" for k, v in m.items())  # noqa: E731
    b = o["proposed"]
    lines = [
        f"  overlapped (grpo.rollout_ahead=1, roofline): learner {b['learner_chips']} chips ({mesh(b['mesh'])}), "
        f"sampler {b['sampler_chips']} chips ({mesh(b['sampler_mesh'])}): max(train {b['train_seconds']:.1f} s, "
        f"rollout {b['rollout_seconds']:.1f} s) + weight push {b['push_seconds']:.3f} s "
        f"({b['push_bytes'] / 1e9:.2f} GB at {o['weight_push_bandwidth'] / 1e9:.0f} GB/s; all parameters: "
        f"{b['full_push_seconds']:.2f} s) = {o['overlapped_seconds']:.1f} s against {o['sequential_seconds']:.1f} s "
        f"sequential on all chips: {o['ratio']:.2f}x" + ("" if o["fits"] else " (NO split fits)"),
        f"    bound: with the train step scaling with its chips and no rollout faster on fewer chips, no split "
        f"tried beats {o['ratio_bound']:.2f}x (split {o['ratio_bound_split']} sampler chips)",
    ]
    for e in o["splits"]:
        mem = e.get("programs")
        fit = (
            " peak "
            + ", ".join(f"{k} {p['total_bytes'] / 1024**3:.1f}" for k, p in mem.items())
            + f" GiB/chip -> {'fits' if e['fits'] else 'OVER'}"
            if mem
            else " (not compiled)"
        )
        lines.append(
            f"    split {e['learner_chips']}+{e['sampler_chips']}: train {e['train_seconds']:.1f} s, rollout "
            f"{e['rollout_seconds']:.1f} s, step {e['step_seconds']:.1f} s;{fit}"
        )
    return lines
