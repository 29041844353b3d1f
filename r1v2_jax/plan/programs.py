"""The programs a plan compiles (the stage's train step, the sampler's prefill and decode),
the compile/memory helpers, and XLA's own step-time estimate with loops counted by trip
count."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from r1v2_jax.model.vlm import R1V2Model, abstract_params, param_shardings
from r1v2_jax.parallel.multihost import batch_shards
from r1v2_jax.rl.ssb import ssb_init
from r1v2_jax.sampling.sampler import Sampler
from r1v2_jax.train.program import PIXEL_DTYPE, abstract_args, build_program


def sds(shape, dtype, sharding):

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


class OutOfMemory:
    """A program the TPU compiler refused for lack of HBM (it stops before a memory analysis)."""

    def __init__(self, message: str):
        self.message = message
        m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", message)
        scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
        self.temp_bytes = int(float(m.group(1)) * scale[m.group(2)]) if m else 0


_COMPILED: collections.OrderedDict = collections.OrderedDict()  # program key -> compiled / OutOfMemory
_COMPILED_MAX = 24  # a 38B plan compiles about a dozen programs


def _program_key(lowered) -> tuple | None:
    """What identifies a compile: the lowered module's text and the devices (the objects
    themselves, as jax compares them, with their kind and, for a mesh, their order) of its
    argument shardings; None when jax does not say."""
    shardings = getattr(getattr(lowered, "_lowering", None), "compile_args", {}).get("in_shardings")
    if shardings is None:
        return None
    where = []
    for sh in shardings:
        mesh = getattr(sh, "mesh", None)
        if mesh is not None and hasattr(mesh, "devices"):
            where.append(("mesh", mesh.axis_names, tuple((id(d), d.id, d.device_kind) for d in mesh.devices.flat)))
        elif hasattr(sh, "device_set"):
            where.append(("set", tuple(sorted((id(d), d.id, d.device_kind) for d in sh.device_set))))
        else:
            where.append(repr(sh))
    return hashlib.sha256(lowered.as_text().encode()).hexdigest(), tuple(where)


def compile_program(lowered):
    """``lowered.compile()`` for planning: the compiler's out-of-HBM refusal comes back as
    :class:`OutOfMemory`; the same program for the same devices is compiled once per process
    (the planner only reads memory and cost analyses; a second plan of one config, as a sweep
    over ``--hbm-gib`` or the reward-model and overlap plans that share programs, costs no
    compiles)."""
    key = _program_key(lowered)
    if key is not None and key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key]
    try:
        out = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA raises JaxRuntimeError
        if "RESOURCE_EXHAUSTED" not in str(e) and "Ran out of memory" not in str(e):
            raise
        out = OutOfMemory(str(e).strip().splitlines()[-1])
    if key is not None:
        _COMPILED[key] = out
        while len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)
    return out


def memory_report(compiled, hbm: int, resident: int = 0) -> dict:
    if isinstance(compiled, OutOfMemory):
        total = compiled.temp_bytes + resident
        return {
            "argument_bytes": 0,
            "temp_bytes": compiled.temp_bytes,
            "output_bytes": 0,
            "alias_bytes": 0,
            "resident_bytes": resident,
            "total_bytes": total,
            "fits": False,
            "compiler_error": compiled.message,
        }
    mem = compiled.memory_analysis()
    args, temps, outs, alias = (
        mem.argument_size_in_bytes,
        mem.temp_size_in_bytes,
        mem.output_size_in_bytes,
        mem.alias_size_in_bytes,
    )
    total = args + temps + outs - alias + resident
    return {
        "argument_bytes": args,
        "temp_bytes": temps,
        "output_bytes": outs,
        "alias_bytes": alias,
        "resident_bytes": resident,
        "total_bytes": total,
        "fits": total <= hbm,
    }


def shard_bytes(x, sharding=None) -> int:
    """Bytes of one chip's shard of ``x`` (a ShapeDtypeStruct) under ``sharding`` (its own)."""
    return int(np.prod((sharding or x.sharding).shard_shape(x.shape))) * np.dtype(x.dtype).itemsize


def gathered_bytes(x) -> int:
    """Bytes of ``x`` one chip holds while using it: sharded over ``tensor`` only (FSDP and data
    shards are all-gathered before a matmul)."""

    def keep(entry):
        names = entry if isinstance(entry, tuple) else (entry,)
        kept = tuple(n for n in names if n == "tensor")
        return kept[0] if kept else None

    return shard_bytes(x, NamedSharding(x.sharding.mesh, P(*(keep(e) for e in x.sharding.spec))))


def per_chip_bytes(tree) -> int:

    return sum(shard_bytes(x) for x in jax.tree.leaves(tree))


@contextlib.contextmanager
def no_compile_cache_writes():
    """TPU executables compiled without a TPU client cannot be read back from the persistent
    compilation cache (a warning and a recompile each time): write none while planning (whether
    the cache is used at all is decided once per process, so only the write threshold can
    still say no)."""

    key = "jax_persistent_cache_min_compile_time_secs"
    was = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update(key, 1e9)
    try:
        yield
    finally:
        jax.config.update(key, was)


@dataclasses.dataclass(frozen=True)
class Job:
    """What every program of one plan shares."""

    cfg: object  # the run config
    algo: str  # "grpo" | "mpo"
    tiles: int  # image tiles per sample


def abstract_param_specs(mc, mesh):

    return jax.tree.map(
        lambda a, s: sds(a.shape, a.dtype, s), abstract_params(mc, boxed=False), param_shardings(mc, mesh)
    )


def train_program_args(exp, algo: str, mc, mesh, rows: int, tiles: int, n_micro: int | None = None):
    """What ``r1v2 train`` would call stage ``algo``'s step with for ``rows`` rows, as
    ShapeDtypeStructs on ``mesh``: (program, (state, batch, ref params or None)). Built by
    :func:`r1v2_jax.train.program.build_program`, the builder training uses; the GRPO state
    carries its SSB buffer when the stage uses one."""

    params = abstract_param_specs(mc, mesh)
    program = build_program(algo, exp, mc, params, mesh, micro_batches=n_micro)
    ssb = None
    if algo == "grpo" and exp.grpo.use_ssb:
        example = program.example_spec(tiles, mc.tile_size)
        ssb = jax.eval_shape(lambda: ssb_init(exp.grpo.ssb.capacity, example))
    return program, abstract_args(program, params, rows, tiles, mc.tile_size, mesh, ssb=ssb)


def train_program(job: Job, mc, mesh, rows: int, n_micro: int):
    """Lower the RL train step over ``rows`` rows (GRPO rollouts or MPO pairs) in ``n_micro``
    micro-batches. Returns (lowered, state, ref params or None)."""
    program, (state, batch, ref) = train_program_args(job.cfg, job.algo, mc, mesh, rows, job.tiles, n_micro)
    return program.step.lower(state, batch, ref), state, ref


def pixels(job: Job, mc, n: int, sharding):

    s = mc.tile_size
    return sds((n, job.tiles, 3, s, s), PIXEL_DTYPE, sharding)


def sampler_programs(job: Job, mc, mesh, decode_loops: tuple[int, ...] = (1,)):
    """Compile the sampler's prefill (``batch_size`` prompts) and decode loop (``batch_size x
    group_size`` rows) as the sampler does: decode first, the cache's layout the compiler's
    choice, then prefill returning the cache in that layout. Returns (prefill, decode
    programs, parameters, KV cache) as compiled (or OutOfMemory) programs and
    ShapeDtypeStructs: one decode program per entry of ``decode_loops``, each running the
    whole loop that many times over the same cache (more than once: for costing one trip of
    the loop body, see :func:`xla_estimate`); the first entry's cache layout is the one prefill
    returns (the default layout when that decode program does not fit)."""

    sampler, pre_args, kw, row = _sampler_args(job, mc, mesh)
    cfg, stage, params = job.cfg, job.cfg.grpo, pre_args[0]
    b = cfg.data.batch_size
    logits, cache, kv_valid, ids = sampler.decode_inputs(*pre_args, **kw)
    sp = stage.sampling(())
    decs = tuple(
        compile_program(
            sampler.lower_decode(
                params,
                logits,
                cache,
                kv_valid,
                ids,
                sds((), jnp.uint32, None),
                sds((b,), jnp.int32, row),
                num_samples=stage.group_size,
                sp=sp,
                loops=loops,
            )
        )
        for loops in decode_loops
    )
    formats = None if isinstance(decs[0], OutOfMemory) else sampler.cache_formats(decs[0])
    outputs = (logits, cache, kv_valid, ids)
    pre = compile_program(sampler.lower_prefill(*pre_args, outputs, **kw, cache_formats=formats))
    return pre, decs, params, cache


def _sampler_args(job: Job, mc, mesh):
    """(sampler, prefill's abstract arguments, its keywords, the row sharding) on ``mesh``."""
    cfg, stage = job.cfg, job.cfg.grpo
    params = abstract_param_specs(mc, mesh)
    row = NamedSharding(mesh, P(("data", "fsdp")))
    b, p, m = cfg.data.batch_size, cfg.data.max_prompt_len, stage.max_new_tokens
    sampler = Sampler(R1V2Model(mc, params, mesh), bucket=1, layer_loop="scan")
    kw = dict(cache_len=p + m, num_samples=stage.group_size)
    pre_args = (
        params,
        sds((b, p), jnp.int32, row),
        sds((b, p), bool, row),
        pixels(job, mc, b, row) if job.tiles else None,
    )
    return sampler, pre_args, kw, row


def sampler_shapes(job: Job, mc, mesh):
    """(parameters, KV cache) of the sampler on ``mesh`` as ShapeDtypeStructs, the cache laid
    out as the sampler places it: the decode roofline's inputs, without compiling."""
    sampler, pre_args, kw, _ = _sampler_args(job, mc, mesh)
    return pre_args[0], sampler.decode_inputs(*pre_args, **kw)[1]


def cost_of(compiled) -> dict:
    """XLA's cost analysis of a compiled program ({} for one the compiler refused)."""
    if isinstance(compiled, OutOfMemory):
        return {}
    cost = compiled.cost_analysis() or {}
    return cost[0] if isinstance(cost, list) else cost


def xla_seconds(compiled) -> float:
    """XLA's own estimate of a compiled program's run time (its cost model's ``optimal_seconds``)."""
    return float(cost_of(compiled).get("optimal_seconds", float("nan")))


def xla_estimate(job: Job, mc, mesh, sampler_mesh, n_micro: int, rows: int) -> dict:
    """XLA's estimated seconds per program, with its loops counted as often as they run.

    XLA's cost analysis counts a loop body once: a scanned layer stack as one layer, the
    micro-batch scan as one micro-batch, the decode loop as one token. So:

    * layers: the programs are compiled again with a few *unrolled* layers per tower
      (everything else as planned, one micro-batch), 2 and 4 (a lone first layer fuses
      differently from the ones that follow it, and one added layer is a noisy step at small
      widths); half the difference is XLA's time for one more layer:
      ``t(L_v, L_t) = t(2, 2) + (L_v - 2)·Δ_v + (L_t - 2)·Δ_t``;
    * micro-batches: the train step is one micro-batch's step times ``micro_batches`` (a
      micro-batch that does not divide over the batch axes is costed padded to whole rows per
      device; the optimizer update of the layers beyond those compiled is not counted:
      elementwise, milliseconds);
    * decode tokens: the decode program also runs its whole loop twice over the same cache;
      the difference is one trip of the loop body (one token for every row), and
      ``decode = t(one loop) + (max_new_tokens - 1)·t(body)``. What runs once, outside the
      loop (e.g. the cache's layout changes into and out of the loop), is counted once.
    """

    lv, lt = min(2, mc.vision.num_layers), min(2, mc.text.num_layers)
    hv, ht = min(lv + 2, mc.vision.num_layers), min(lt + 2, mc.text.num_layers)
    # one micro-batch, padded to whole rows per device when it does not divide (as XLA pads it)
    shards = batch_shards(mesh)
    micro_rows = -(-(rows // n_micro) // shards) * shards

    def times(v, t):
        m = mc.replace(
            scan_layers=False,
            vision=dataclasses.replace(mc.vision, num_layers=v),
            text=dataclasses.replace(mc.text, num_layers=t),
        )
        out = {"train": xla_seconds(compile_program(train_program(job, m, mesh, micro_rows, 1)[0]))}
        if job.algo == "grpo":
            pre, (once, twice), _, _ = sampler_programs(job, m, sampler_mesh, decode_loops=(1, 2))
            out.update(
                prefill=xla_seconds(pre), decode=xla_seconds(once), decode_body=xla_seconds(twice) - xla_seconds(once)
            )
        return out

    base = times(lv, lt)
    est = dict(base)
    if ht > lt:
        more = times(lv, ht)
        est = {k: est[k] + (mc.text.num_layers - lt) * (more[k] - base[k]) / (ht - lt) for k in est}
    if job.tiles and hv > lv:
        more = times(hv, lt)
        est = {k: est[k] + (mc.vision.num_layers - lv) * (more[k] - base[k]) / (hv - lv) for k in est}
    out = {"train": est["train"] * n_micro}
    if job.algo == "grpo":
        out["prefill"] = est["prefill"]
        out["decode"] = est["decode"] + (job.cfg.grpo.max_new_tokens - 1) * est["decode_body"]
    return out
