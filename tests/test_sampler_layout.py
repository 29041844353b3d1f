"""The dense sampler's KV cache on TPU: decode holds it once (compiled ahead of time for v5p).

XLA:TPU lays a while loop's carried cache out as the loop's attention prefers; with the cache
argument in the default layout it copies K and V into that layout before the loop and back
after it (two temporaries the size of the cache). The sampler compiles decode with the
cache's layout left to the compiler and prefill returning that layout (r1v2_jax.sampling.sampler).
"""

import math
import re

import jax
import jax.numpy as jnp
import pytest

from r1v2_jax.parallel.sharding import make_mesh
from r1v2_jax.plan.programs import Job, _sampler_args, no_compile_cache_writes, sampler_programs, sds
from r1v2_jax.plan.topology import devices_for, parse_topology
from r1v2_jax.train.config_files import load_experiment
from r1v2_jax.train.experiment import model_config_from


def _cache_copies(compiled, cache) -> list[str]:
    """copy instructions of the program whose result has one chip's shape of the cache."""
    dims = ",".join(str(d) for d in cache.sharding.shard_shape(cache.shape))
    return [
        line.strip()[:160]
        for line in compiled.as_text().splitlines()
        if re.search(r"\bcopy(-start)?\(", line) and re.search(rf"= \w+\[{dims}\]", line)
    ]


def test_decode_holds_the_kv_cache_once_on_tpu():
    pytest.importorskip("libtpu")
    with no_compile_cache_writes():
        cfg = load_experiment("configs/demo.py", ["--config.grpo.max_new_tokens=32"])
        mesh = make_mesh(1, 4, 1, devices=devices_for(parse_topology("v5p-8")))
        mc = model_config_from(cfg).replace(scan_layers=True)
        job = Job(cfg, "grpo", cfg.plan.tiles_per_sample)
        pre, (dec,), params, cache = sampler_programs(job, mc, mesh)

        # the program as it was compiled before: the cache argument in the default layout
        sampler, pre_args, kw, row = _sampler_args(job, mc, mesh)
        logits, _, kv_valid, ids = sampler.decode_inputs(*pre_args, **kw)
        g, sp = cfg.grpo.group_size, cfg.grpo.sampling(())
        default = jax.jit(
            lambda p, lg, c, kv, i, s, pi: sampler._decode_impl(p, lg, c, kv, i, s, pi, g, sp),
            donate_argnums=(2,),
        )
        seed, index = sds((), jnp.uint32, None), sds((cfg.data.batch_size,), jnp.int32, row)
        before = default.lower(params, logits, cache, kv_valid, ids, seed, index).compile()

    cache_bytes = sum(c.dtype.itemsize * math.prod(c.sharding.shard_shape(c.shape)) for c in cache)
    assert _cache_copies(before, cache[0]), "the default-layout program no longer copies the cache: test is moot"
    assert _cache_copies(dec, cache[0]) == []
    mem = dec.memory_analysis()
    assert mem.alias_size_in_bytes >= cache_bytes  # the donated cache is updated in place
    assert mem.temp_size_in_bytes < before.memory_analysis().temp_size_in_bytes - cache_bytes / 2
    # prefill returns the cache in exactly the formats decode takes: nothing relays it out between
    assert tuple(pre.output_formats[1]) == tuple(sampler.cache_formats(dec))
