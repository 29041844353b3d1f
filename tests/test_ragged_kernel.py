"""The paged engine's TPU decode attention (the Pallas ragged paged attention kernel): our
arguments against the kernel's own reference implementation on CPU, the XLA path against the
same reference, and the engine's decode block compiled ahead of time for a TPU chip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.ragged_paged_attention.kernel import ref_ragged_paged_attention
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from r1v2_jax.model.config import ModelConfig, TextConfig, model_config
from r1v2_jax.sampling.engine import EngineConfig, PagedEngine
from r1v2_jax.sampling.paged import PagedKV, PoolLayout, interleave, ragged_args


def _case(seed, s=5, hq=4, hkv=2, d=16, ps=4, n=4, pool=24):
    rng = np.random.default_rng(seed)
    f = lambda *sh: jnp.asarray(rng.standard_normal(sh), jnp.float32)  # noqa: E731
    pages = f(pool, ps, 2 * hkv, d)
    table = jnp.asarray(rng.permutation(np.arange(1, pool))[: s * n].reshape(s, n), jnp.int32)
    length = jnp.asarray([1, 3, ps + 1, 2 * ps, n * ps][:s], jnp.int32)  # one token .. the whole table
    ctx = length - 1  # the new token's position
    write_page = jnp.take_along_axis(table, (ctx // ps)[:, None], axis=1)[:, 0]
    return PagedKV(pages, table, write_page, ctx % ps, length), f(s, 1, hq, d), f(s, 1, hkv, d), f(s, 1, hkv, d)


def test_interleaved_layout_is_the_kernels():
    k = jnp.arange(2 * 3 * 4.0).reshape(2, 3, 4)
    v = -k
    both = interleave(k, v)
    np.testing.assert_array_equal(both[:, 0::2], k)  # the kernel's reference reads keys at 0::2
    np.testing.assert_array_equal(both[:, 1::2], v)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_xla_decode_and_ragged_arguments_agree_with_the_kernels_reference(seed):
    """The XLA path's output equals the kernel's reference (jax's ``ref_ragged_paged_attention``)
    called with exactly the arguments the ragged path hands the kernel, on the pool with the new
    token written: kv_lens counting it, the page table, one query per slot, GQA."""
    cache, q, k, v = _case(seed)
    out, new = cache.attend(q, k, v)
    # the new token sits at its page and offset, interleaved
    p, o = int(new.write_page[2]), int(new.write_offset[2])
    np.testing.assert_array_equal(new.pages[p, o, 0::2], k[2, 0])
    np.testing.assert_array_equal(new.pages[p, o, 1::2], v[2, 0])
    d = q.shape[-1]
    ref = ref_ragged_paged_attention(*ragged_args(q[:, 0], new.pages, new.length, new.table), sm_scale=d**-0.5)
    np.testing.assert_allclose(np.asarray(out[:, 0]), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # and a hand computation for the one-token slot: softmax over one key is that value
    np.testing.assert_allclose(out[0, 0, :2], jnp.broadcast_to(v[0, 0, 0], (2, d)), rtol=1e-6, atol=1e-6)


def _kernel_model_config() -> ModelConfig:
    """Tiny, but with the kernel's head shape: head_dim 128, 4 query / 2 KV heads, bfloat16."""
    t = model_config("tiny")
    return t.replace(
        text=TextConfig(
            vocab_size=512, hidden_size=512, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256
        ),
        dtype="bfloat16",
        param_dtype="bfloat16",
    )


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [None, (2, 1, 2)])
def test_engine_decode_block_compiles_for_a_tpu_chip_with_the_kernel(mesh_shape):
    """attention="ragged": the engine's K-step decode program lowers and compiles for one v5p
    chip (abstract, no TPU here) with the kernel inside it, and on a mesh of four (slots and
    pools over data, KV heads over tensor: the kernel per shard inside shard_map); the XLA path
    compiles too."""
    from r1v2_jax.parallel.sharding import DEFAULT_RULES, MESH_AXES, use_mesh_rules
    from r1v2_jax.plan.programs import no_compile_cache_writes
    from r1v2_jax.plan.topology import devices_for, parse_topology

    devs = devices_for(parse_topology("v5p-8"))
    dev = devs[0]
    if mesh_shape is None:
        mesh, layout = Mesh(np.array([dev]), ("x",)), PoolLayout()
    else:
        mesh = Mesh(np.array(devs[:4]).reshape(mesh_shape), MESH_AXES)
        layout = PoolLayout.for_mesh(mesh, DEFAULT_RULES, slots=8, kv_heads=2)
    cfg = _kernel_model_config()
    hlo = {}
    for impl in ("ragged", "xla"):
        eng = PagedEngine.__new__(PagedEngine)  # the compiled programs only: no weights, no host loop
        eng.model = type("M", (), {"config": cfg, "mesh": None})()
        eng.cfg = EngineConfig(slots=8, steps_per_sync=4, page_size=16, attention=impl)
        eng.kv_dtype = jnp.dtype(jnp.bfloat16)
        eng.attention = (impl, eng.cfg.pages_per_block, eng.cfg.queries_per_block)
        eng.layout = layout
        args = _abstract_block_args(eng, cfg, mesh, layout, num_pages=64, n=8)
        # the kernel reads the chip's kind from the default device; TPU executables are not
        # written to the persistent cache (a CPU process cannot read them back)
        with jax.default_device(dev), use_mesh_rules(layout.mesh), no_compile_cache_writes():
            lowered = jax.jit(eng._block_impl, static_argnames=("sp",)).lower(*args, sp=_sp())
            compiled = lowered.compile()
        assert compiled is not None
        hlo[impl] = lowered.as_text()
    assert "ragged_paged_attention" in hlo["ragged"] and "ragged_paged_attention" not in hlo["xla"]
    if mesh_shape is not None:  # the pool operations run per shard, in a manual (shard_map) region
        assert "shard_map" in hlo["ragged"] or "sdy.manual_computation" in hlo["ragged"]


def _sp():
    from r1v2_jax.sampling.sampler import SamplingParams

    return SamplingParams(max_new_tokens=32, temperature=1.0, eos_ids=(1,), pad_id=1)


def _abstract_block_args(eng, cfg, mesh, layout, *, num_pages, n):
    from r1v2_jax.model.vlm import init_params
    from r1v2_jax.sampling import unrolled
    from r1v2_jax.sampling.paged import POOL

    rep = NamedSharding(mesh, P())
    slots = NamedSharding(mesh, layout.spec("b")) if layout.mesh is not None else rep
    sds = lambda x, sh=rep: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)  # noqa: E731
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    dparams = jax.tree.map(sds, jax.eval_shape(lambda p: unrolled.split_layers(p, config=cfg), params))
    t = cfg.text
    pool = jax.ShapeDtypeStruct(
        (layout.shards * num_pages, eng.cfg.page_size, 2 * t.num_kv_heads, t.resolved_head_dim), jnp.bfloat16
    )
    pool_sharding = NamedSharding(mesh, layout.spec(*POOL)) if layout.mesh is not None else rep
    pools = [sds(pool, pool_sharding) for _ in range(t.num_layers)]
    s, v, p = eng.cfg.slots, t.vocab_size, 16
    i32 = lambda *sh: jax.ShapeDtypeStruct(sh, jnp.int32, sharding=slots)  # noqa: E731
    flag = jax.ShapeDtypeStruct((s,), bool, sharding=slots)
    state = dict(
        logits=jax.ShapeDtypeStruct((s, v), jnp.float32, sharding=slots),
        presence=None,
        gen=i32(s),
        ctx=i32(s),
        done=flag,
        prompt=i32(s),
        g=i32(s),
    )
    admit = dict(
        new=flag,
        row=i32(s),
        cow_src=i32(s),
        cow_dst=i32(s),
        prompt_ids=i32(s, p),
        prompt_mask=jax.ShapeDtypeStruct((s, p), bool, sharding=slots),
    )
    prompt_logits = jax.ShapeDtypeStruct((4, v), jnp.float32, sharding=rep)
    seed = jax.ShapeDtypeStruct((), jnp.uint32, sharding=rep)
    return dparams, pools, state, prompt_logits, admit, i32(s, n), seed
