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
:func:`_xla_estimate`; ``plan.xla_estimate=False`` skips the extra compiles), and the MFU
each implies. A config that does not fit exits
non-zero, naming the largest buffers; a micro-batch that does not divide over the batch axes
is reported.

Not covered: multi-slice (DCN) topologies, and the cost of resharding parameters between
different learner and sampler meshes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re

import numpy as np

GiB = 1024**3
# family -> (HBM bytes per chip, peak bf16 FLOP/s per chip, HBM bytes/s per chip, topology dims,
# cores per chip in the slice name), from Cloud TPU's published specifications.
_FAMILIES = {
    "v4": (32 * GiB, 275e12, 1.2e12, 3, 2),
    "v5p": (95 * GiB, 459e12, 2.765e12, 3, 2),
    "v5e": (16 * GiB, 197e12, 0.819e12, 2, 1),
    "v6e": (32 * GiB, 918e12, 1.64e12, 2, 1),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    topology_name: str
    chips: int
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float


def parse_topology(name: str) -> Topology:
    """``v5p-128`` (128 cores = 64 chips, 4x4x4), ``v4-32``, ``v5e-16``, ``v6e-64``, or an explicit
    ``v5p:4x4x4``."""
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip())
    if not m:
        raise ValueError(f"topology {name!r}: expected e.g. v5p-128, v4-32, v5e-16, v6e-64 or v5p:4x4x4")
    fam, count, dims = m.group(1), m.group(2), m.group(3)
    hbm, peak, bw, ndim, cores = _FAMILIES[fam]
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
    return Topology(name, topo, int(np.prod(shape)), hbm, peak, bw)


def _devices(topology: Topology):
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # only compiling: let another process (a second plan, a test) use libtpu at the same time
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=topology.topology_name).devices
    except Exception as e:  # noqa: BLE001 - no libtpu, or an unknown topology
        raise RuntimeError(f"cannot describe TPU topology {topology.topology_name} ({e}); "
                           "install the compiler with: pip install \"jax[tpu]==<jax version>\"") from None



def _matmul_params(mc) -> int:
    """Weights the LLM multiplies by per token (decoder layers + lm_head)."""
    t = mc.text
    hd = t.resolved_head_dim
    per_layer = (t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * hd + t.num_heads * hd * t.hidden_size
                 + 3 * t.hidden_size * t.intermediate_size)
    return t.num_layers * per_layer + t.hidden_size * t.vocab_size


def forward_flops(mc, tokens: int, seq: int) -> float:
    """Analytic forward FLOPs of the LLM over ``tokens`` tokens of sequences of length ``seq``:
    2 x matmul parameters per token + attention (4 x seq x heads x head_dim per token and
    layer). The vision tower is not counted (text FLOPs dominate long reasoning)."""
    t = mc.text
    return 2.0 * _matmul_params(mc) * tokens + t.num_layers * tokens * 4.0 * seq * t.num_heads * t.resolved_head_dim


def train_step_flops(mc, tokens: int, seq: int, forwards: int = 1) -> float:
    """Forward + backward (3x forward) over ``tokens``, plus ``forwards - 1`` extra
    forward-only passes (e.g. MPO's frozen reference)."""
    f = forward_flops(mc, tokens, seq)
    return 3.0 * f + (forwards - 1) * f


def kernel_flops(job, mc, rows: int, seq: int) -> float:
    """Analytic FLOPs of the Pallas attention kernels in one train step (XLA's cost analysis
    omits them): every decoder layer's causal attention over ``rows`` sequences of ``seq`` tokens
    (forward, its recompute under remat, and the backward: 3.5x the forward with the separate dq /
    dkv kernels) and the ViT's bidirectional attention over ``job.tiles`` tiles per row (forward
    only unless the ViT trains); MPO runs chosen and rejected through the policy and, forward
    only, through the frozen reference."""
    from r1v2_jax.model.attention import attention_flops

    t, v = mc.text, mc.vision
    trains_vit = getattr(job.cfg, job.algo).optim.trainable in ("adapter+vit", "all")
    recompute = 0.0 if mc.remat_policy == "none" else 1.0
    n_tok = 1 + (mc.tile_size // v.patch_size) ** 2
    seqs, ref_seqs = (rows, 0) if job.algo == "grpo" else (2 * rows, 2 * rows)

    def passes(train: bool, n: int, n_ref: int) -> float:
        return n * ((1 + recompute + 3.5) if train else 1.0) + n_ref

    text = t.num_layers * attention_flops(1, seq, t.num_heads, t.resolved_head_dim, True, False)
    vit = v.num_layers * attention_flops(1, n_tok, v.num_heads, v.head_dim, False, False)
    return text * passes(True, seqs, ref_seqs) + vit * job.tiles * passes(trains_vit, seqs, ref_seqs)


def _sds(shape, dtype, sharding):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


class _OutOfMemory:
    """A program the TPU compiler refused for lack of HBM (it stops before a memory analysis)."""

    def __init__(self, message: str):
        self.message = message
        m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", message)
        scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
        self.temp_bytes = int(float(m.group(1)) * scale[m.group(2)]) if m else 0


def _compile(lowered):
    try:
        return lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA raises JaxRuntimeError
        if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
            return _OutOfMemory(str(e).strip().splitlines()[-1])
        raise


def _memory(compiled, hbm: int, resident: int = 0) -> dict:
    if isinstance(compiled, _OutOfMemory):
        total = compiled.temp_bytes + resident
        return {"argument_bytes": 0, "temp_bytes": compiled.temp_bytes, "output_bytes": 0, "alias_bytes": 0,
                "resident_bytes": resident, "total_bytes": total, "fits": False, "compiler_error": compiled.message}
    mem = compiled.memory_analysis()
    args, temps, outs, alias = (mem.argument_size_in_bytes, mem.temp_size_in_bytes, mem.output_size_in_bytes,
                                mem.alias_size_in_bytes)
    total = args + temps + outs - alias + resident
    return {"argument_bytes": args, "temp_bytes": temps, "output_bytes": outs, "alias_bytes": alias,
            "resident_bytes": resident, "total_bytes": total, "fits": total <= hbm}


def _shard_bytes(x, sharding=None) -> int:
    """Bytes of one chip's shard of ``x`` (a ShapeDtypeStruct) under ``sharding`` (its own)."""
    return int(np.prod((sharding or x.sharding).shard_shape(x.shape))) * np.dtype(x.dtype).itemsize


def _gathered_bytes(x) -> int:
    """Bytes of ``x`` one chip holds while using it: sharded over ``tensor`` only (FSDP and data
    shards are all-gathered before a matmul)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    def keep(entry):
        names = entry if isinstance(entry, tuple) else (entry,)
        kept = tuple(n for n in names if n == "tensor")
        return kept[0] if kept else None

    return _shard_bytes(x, NamedSharding(x.sharding.mesh, P(*(keep(e) for e in x.sharding.spec))))


def _per_chip_bytes(tree) -> int:
    import jax

    return sum(_shard_bytes(x) for x in jax.tree.leaves(tree))


@contextlib.contextmanager
def no_compile_cache_writes():
    """TPU executables compiled without a TPU client cannot be read back from the persistent
    compilation cache (a warning and a recompile each time): write none while planning (whether
    the cache is used at all is decided once per process, so only the write threshold can
    still say no)."""
    import jax

    key = "jax_persistent_cache_min_compile_time_secs"
    was = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update(key, 1e9)
    try:
        yield
    finally:
        jax.config.update(key, was)


def plan(cfg, topology: str, hbm_bytes: int | None = None) -> dict:
    """Compile the RL stage's programs of ``cfg`` (an Experiment, or a ConfigDict checked into
    one) for ``topology`` and report."""
    from r1v2_jax.train.schema import from_config_dict

    if not dataclasses.is_dataclass(cfg):
        cfg = from_config_dict(cfg)
    with no_compile_cache_writes():
        return _plan(cfg, topology, hbm_bytes)


@dataclasses.dataclass(frozen=True)
class _Job:
    """What every program of one plan shares."""
    cfg: object  # the run config
    algo: str  # "grpo" | "mpo"
    tiles: int  # image tiles per sample


def _abstract_params(mc, mesh):
    import jax

    from r1v2_jax.model.vlm import abstract_params, param_shardings

    return jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), abstract_params(mc, boxed=False),
                        param_shardings(mc, mesh))


def train_program_args(exp, algo: str, mc, mesh, rows: int, tiles: int, n_micro: int | None = None):
    """What ``r1v2 train`` would call stage ``algo``'s step with for ``rows`` rows, as
    ShapeDtypeStructs on ``mesh``: (program, (state, batch, ref params or None)). Built by
    :func:`r1v2_jax.train.program.build_program`, the builder training uses; the GRPO state
    carries its SSB buffer when the stage uses one."""
    import jax

    from r1v2_jax.rl.ssb import ssb_init
    from r1v2_jax.train.program import abstract_args, build_program

    params = _abstract_params(mc, mesh)
    program = build_program(algo, exp, mc, params, mesh, micro_batches=n_micro)
    ssb = None
    if algo == "grpo" and exp.grpo.use_ssb:
        example = program.example_spec(tiles, mc.tile_size)
        ssb = jax.eval_shape(lambda: ssb_init(exp.grpo.ssb.capacity, example))
    return program, abstract_args(program, params, rows, tiles, mc.tile_size, mesh, ssb=ssb)


def _train_program(job: _Job, mc, mesh, rows: int, n_micro: int):
    """Lower the RL train step over ``rows`` rows (GRPO rollouts or MPO pairs) in ``n_micro``
    micro-batches. Returns (lowered, state, ref params or None)."""
    program, (state, batch, ref) = train_program_args(job.cfg, job.algo, mc, mesh, rows, job.tiles, n_micro)
    return program.step.lower(state, batch, ref), state, ref


def _pixels(job: _Job, mc, n: int, sharding):
    from r1v2_jax.train.program import PIXEL_DTYPE

    s = mc.tile_size
    return _sds((n, job.tiles, 3, s, s), PIXEL_DTYPE, sharding)


def _sampler_programs(job: _Job, mc, mesh, decode_loops: tuple[int, ...] = (1,)):
    """Compile the sampler's prefill (``batch_size`` prompts) and decode loop (``batch_size x
    group_size`` rows). Returns (prefill, decode programs, parameters, KV cache) as compiled
    (or _OutOfMemory) programs and ShapeDtypeStructs: one decode program per entry of
    ``decode_loops``, each running the whole loop that many times over the same cache (more
    than once: for costing one trip of the loop body, see :func:`_xla_estimate`)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from r1v2_jax.model.vlm import R1V2Model, abstract_params, param_shardings
    from r1v2_jax.sampling.sampler import Sampler

    cfg, stage = job.cfg, job.cfg.grpo
    params = jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), abstract_params(mc, boxed=False),
                          param_shardings(mc, mesh))
    row = NamedSharding(mesh, P(("data", "fsdp")))
    b, p, m = cfg.data.batch_size, cfg.data.max_prompt_len, stage.max_new_tokens
    sampler = Sampler(R1V2Model(mc, params, mesh), bucket=1, layer_loop="scan")
    kw = dict(cache_len=p + m, num_samples=stage.group_size)
    pre_args = (params, _sds((b, p), jnp.int32, row), _sds((b, p), bool, row),
                _pixels(job, mc, b, row) if job.tiles else None)
    pre = _compile(sampler.lower_prefill(*pre_args, **kw))
    logits, cache, kv_valid, ids = sampler.prefill_shapes(*pre_args, **kw)
    if isinstance(pre, _OutOfMemory):  # decode's inputs as the constraints lay them out
        from r1v2_jax.model.qwen2 import CACHE_AXES
        from r1v2_jax.parallel.sharding import logical_to_pspec

        cache_sh = NamedSharding(mesh, logical_to_pspec(CACHE_AXES, shape=cache[0].shape, mesh=mesh))
        outs = (row, (cache_sh, cache_sh), row, row)
    else:
        outs = tuple(pre.output_shardings)
    logits, cache, kv_valid, ids = jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s),
                                                (logits, cache, kv_valid, ids), outs)
    sp = stage.sampling(())

    decs = tuple(_compile(sampler.lower_decode(params, logits, cache, kv_valid, ids, _sds((), jnp.uint32, None),
                                               _sds((b,), jnp.int32, row), num_samples=stage.group_size, sp=sp,
                                               loops=loops)) for loops in decode_loops)
    return pre, decs, params, cache


def _cost(compiled) -> dict:
    """XLA's cost analysis of a compiled program ({} for one the compiler refused)."""
    if isinstance(compiled, _OutOfMemory):
        return {}
    cost = compiled.cost_analysis() or {}
    return cost[0] if isinstance(cost, list) else cost


def _xla_seconds(compiled) -> float:
    """XLA's own estimate of a compiled program's run time (its cost model's ``optimal_seconds``)."""
    return float(_cost(compiled).get("optimal_seconds", float("nan")))


def _xla_estimate(job: _Job, mc, mesh, sampler_mesh, n_micro: int, rows: int) -> dict:
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
    from r1v2_jax.parallel.multihost import batch_shards

    lv, lt = min(2, mc.vision.num_layers), min(2, mc.text.num_layers)
    hv, ht = min(lv + 2, mc.vision.num_layers), min(lt + 2, mc.text.num_layers)
    # one micro-batch, padded to whole rows per device when it does not divide (as XLA pads it)
    shards = batch_shards(mesh)
    micro_rows = -(-(rows // n_micro) // shards) * shards

    def times(v, t):
        m = mc.replace(scan_layers=False, vision=dataclasses.replace(mc.vision, num_layers=v),
                       text=dataclasses.replace(mc.text, num_layers=t))
        out = {"train": _xla_seconds(_compile(_train_program(job, m, mesh, micro_rows, 1)[0]))}
        if job.algo == "grpo":
            pre, (once, twice), _, _ = _sampler_programs(job, m, sampler_mesh, decode_loops=(1, 2))
            out.update(prefill=_xla_seconds(pre), decode=_xla_seconds(once),
                       decode_body=_xla_seconds(twice) - _xla_seconds(once))
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


def _plan(cfg, topology: str, hbm_bytes: int | None) -> dict:
    import jax

    from r1v2_jax.model.attention import resolve_impl
    from r1v2_jax.parallel.multihost import batch_shards
    from r1v2_jax.parallel.sharding import make_mesh, use_mesh_rules
    from r1v2_jax.train.experiment import model_config_from
    from r1v2_jax.train.schema import mesh_for

    topo = parse_topology(topology)
    hbm = hbm_bytes or topo.hbm_bytes
    devices = _devices(topo)
    algo = "grpo" if "grpo" in cfg.stages else "mpo" if "mpo" in cfg.stages else None
    if algo is None:
        raise ValueError(f"stages: {tuple(cfg.stages)} has no RL stage (grpo or mpo) to plan")
    stage = getattr(cfg, algo)
    job = _Job(cfg, algo, cfg.plan.tiles_per_sample)
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
        notes.append(f"{algo} micro-batch: {n} rows / {n_micro} micro-batches = {n / n_micro:g} rows over "
                     f"data x fsdp = {shards}: not a whole number of rows per device (XLA pads or replicates)")
    lowered, state, ref = _train_program(job, mc, mesh, n, n_micro)
    compiled = _compile(lowered)
    cost = _cost(compiled)
    with use_mesh_rules(mesh):
        impl = resolve_impl(mc.attention_impl, t)
    programs["train"] = {**_memory(compiled, hbm), "flops": flops, "tokens": tokens,
                         "seconds": flops / (peak_s * cfg.plan.assumed_mfu),
                         "xla_flops_scan_body_once": float(cost.get("flops", float("nan"))),
                         "attention_impl": impl, "logprob_chunk_size": mc.logprob_chunk_size,
                         "kernel_flops": kernel_flops(job, mc, n, t) if impl == "splash" else 0.0}
    # the same step as before issue 15 (materialised attention, whole-sequence logits), side by side
    before = mc.replace(attention_impl="xla", logprob_chunk_size=t)
    baseline = _memory(_compile(_train_program(job, before, mesh, n, n_micro)[0]), hbm)
    opt_bytes = _per_chip_bytes(state.opt_state) + (_per_chip_bytes(ref) if ref is not None else 0)
    if sampler_mesh is not mesh:  # the learner's copy of the parameters stays too
        opt_bytes += _per_chip_bytes(state.params)

    if algo == "grpo":
        pre, (dec,), s_params, cache = _sampler_programs(job, mc, sampler_mesh)
        b, p, m = cfg.data.batch_size, cfg.data.max_prompt_len, stage.max_new_tokens
        pre_f = forward_flops(mc, b * p, p)
        programs["prefill"] = {**_memory(pre, hbm, opt_bytes), "flops": pre_f, "tokens": b * p,
                               "seconds": pre_f / (peak_s * cfg.plan.assumed_mfu)}
        rows = b * stage.group_size
        # each token step reads every weight of the chip's tensor shard (after FSDP all-gathers)
        # and its rows' whole KV cache
        per_token_bytes = sum(_gathered_bytes(x) for x in jax.tree.leaves(s_params)) + _per_chip_bytes(cache)
        per_token_s = max(per_token_bytes / (topo.hbm_bandwidth * cfg.plan.assumed_bandwidth_util),
                          forward_flops(mc, rows, p + m) / peak_s)
        programs["decode"] = {**_memory(dec, hbm, opt_bytes), "flops": forward_flops(mc, rows, p + m) * m,
                              "tokens": rows * m, "seconds": per_token_s * m,
                              "bytes_per_token_step": per_token_bytes}
    if cfg.plan.xla_estimate:
        for name, s in _xla_estimate(job, mc, mesh, sampler_mesh, n_micro, n).items():
            programs[name]["xla_seconds"] = s
        # XLA's estimate leaves the Pallas kernels out: add their FLOPs at the stated efficiency
        tr = programs["train"]
        tr["kernel_seconds"] = tr["kernel_flops"] / (peak_s * cfg.plan.kernel_efficiency)
        tr["xla_seconds_outside_kernels"] = tr["xla_seconds"]
        tr["xla_seconds"] += tr["kernel_seconds"]
        tr["xla_mfu"] = tr["flops"] / (tr["xla_seconds"] * peak_s)
    leaves = []
    for kp, x in jax.tree_util.tree_flatten_with_path((state.params, state.opt_state))[0]:
        leaves.append((_shard_bytes(x), jax.tree_util.keystr(kp)))
    leaves.sort(reverse=True)
    peak = max(p_["total_bytes"] for p_ in programs.values())
    step_s = sum(p_["seconds"] for p_ in programs.values())
    total_flops = sum(p_["flops"] for p_ in programs.values())
    xla_s = sum(p_["xla_seconds"] for p_ in programs.values()) if cfg.plan.xla_estimate else None
    return {
        "algorithm": algo, "trainable": stage.optim.trainable, "remat_policy": remat, "topology": topo.name,
        "topology_name": topo.topology_name,
        "chips": len(devices), "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "sampler_mesh": {k: int(v) for k, v in sampler_mesh.shape.items()}, "hbm_per_chip": hbm,
        "programs": programs, "peak_bytes": peak, "fits": all(p_["fits"] for p_ in programs.values()),
        "step_seconds": step_s, "flops_per_step": total_flops, "mfu": total_flops / (step_s * peak_s),
        "xla_step_seconds": xla_s, "xla_mfu": total_flops / (xla_s * peak_s) if xla_s else None,
        "assumed_mfu": cfg.plan.assumed_mfu, "assumed_bandwidth_util": cfg.plan.assumed_bandwidth_util,
        "largest_buffers": [(name, b_) for b_, name in leaves[:5]], "notes": notes,
        "baseline_train": baseline, "kernel_efficiency": cfg.plan.kernel_efficiency,
        # kept for scripts reading the first version's fields
        "argument_bytes": programs["train"]["argument_bytes"], "temp_bytes": programs["train"]["temp_bytes"],
        "total_bytes": peak,
    }


def _secs(x) -> str:
    """Seconds for the report: "-" when not estimated, "n/a" when a program could not be compiled."""
    return "-" if x is None else "n/a" if x != x else f"{x:.2f}" if x >= 0.01 else f"{x:.1e}"


def format_plan(r: dict) -> str:
    g = lambda b: f"{b / GiB:7.2f}"  # noqa: E731
    mesh = lambda m: "x".join(f"{k}={v}" for k, v in m.items())  # noqa: E731
    lines = [f"plan: {r['algorithm'].upper()} (trainable: {r['trainable']}, remat: {r['remat_policy']}) "
             f"on {r['topology']} "
             f"({r['topology_name']}, {r['chips']} chips); learner mesh {mesh(r['mesh'])}"
             + (f", sampler mesh {mesh(r['sampler_mesh'])}" if r["sampler_mesh"] != r["mesh"] else ""),
             f"  per chip, GiB   {'args':>7} {'temps':>7} {'outs':>7} {'alias':>7} {'resident':>8} {'total':>7}"
             f"  of {r['hbm_per_chip'] / GiB:.0f}  {'roofline s':>10} {'XLA s':>9}"]
    for name, p in r["programs"].items():
        lines.append(f"  {name:<14} {g(p['argument_bytes'])} {g(p['temp_bytes'])} {g(p['output_bytes'])} "
                     f"{g(p['alias_bytes'])} {g(p['resident_bytes']):>8} {g(p['total_bytes'])}  "
                     f"{'fits ' if p['fits'] else 'OVER '} {_secs(p['seconds']):>10} {_secs(p.get('xla_seconds')):>9}")
    lines += [f"  peak {r['peak_bytes'] / GiB:.2f} GiB per chip -> {'fits' if r['fits'] else 'DOES NOT FIT'}",
              f"  step time (roofline: train/prefill at {r['assumed_mfu']:.0%} MFU, decode at "
              f"{r['assumed_bandwidth_util']:.0%} of HBM bandwidth): {r['step_seconds']:.1f} s, "
              f"{r['flops_per_step']:.3e} FLOPs -> MFU {r['mfu']:.1%}"]
    tr, base = r["programs"]["train"], r.get("baseline_train")
    if base is not None:
        lines.append(f"  train program, before -> now: temps {base['temp_bytes'] / GiB:.2f} -> "
                     f"{tr['temp_bytes'] / GiB:.2f} GiB, total {base['total_bytes'] / GiB:.2f} -> "
                     f"{tr['total_bytes'] / GiB:.2f} GiB per chip "
                     f"(before: xla attention, whole-sequence logits; now: {tr['attention_impl']} attention, "
                     f"log-probs in chunks of {tr['logprob_chunk_size']})")
    if "kernel_seconds" in tr:
        lines.append(f"  train step (XLA outside the kernels {_secs(tr['xla_seconds_outside_kernels'])} s + "
                     f"{tr['kernel_flops']:.3e} kernel FLOPs at {r['kernel_efficiency']:.0%} of peak "
                     f"{_secs(tr['kernel_seconds'])} s): {_secs(tr['xla_seconds'])} s -> train MFU {tr['xla_mfu']:.1%}")
    if r["xla_step_seconds"] is not None:
        lines.append(f"  step time (XLA's cost model, loops counted by trip count): {_secs(r['xla_step_seconds'])} s"
                     + (f" -> MFU {r['xla_mfu']:.1%}" if r["xla_mfu"] == r["xla_mfu"] else ""))
    lines.append("  largest per-chip parameter / optimizer buffers:")
    lines += [f"    {b / GiB:8.3f} GiB  {name}" for name, b in r["largest_buffers"]]
    lines += [f"  note: {n}" for n in r["notes"]]
    lines += [f"  {name}: the TPU compiler ran out of HBM: {p['compiler_error']}"
              for name, p in r["programs"].items() if "compiler_error" in p]
    return "\n".join(lines)
