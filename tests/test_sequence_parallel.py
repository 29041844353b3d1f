"""Sequence parallelism (ModelConfig.sequence_parallel): the same loss and gradients, the residual
stream between layers split over ``tensor`` by sequence, and less memory kept for the backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1v2_jax.model.config import model_config
from r1v2_jax.model.vlm import R1V2, init_params, param_shardings
from r1v2_jax.parallel.sharding import make_mesh, use_mesh_rules


def _program(mc, mesh, ids):
    module = R1V2(mc)

    def loss(params, ids):
        with use_mesh_rules(mesh):
            logits = module.apply({"params": params}, ids)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return -jnp.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1).mean()

    params = jax.device_put(init_params(mc, jax.random.key(0)), param_shardings(mc, mesh))
    return jax.jit(jax.value_and_grad(loss)), params


def test_same_loss_and_gradients_and_less_memory_kept():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    mesh = make_mesh(1, 2, 4)
    base = model_config("tiny").replace(remat_policy="full", attention_impl="xla")
    ids = jax.random.randint(jax.random.key(1), (2, 512), 0, base.text.vocab_size)
    results, temps = {}, {}
    for sp in (False, True):
        mc = base.replace(sequence_parallel=sp)
        fn, params = _program(mc, mesh, ids)
        compiled = fn.lower(params, ids).compile()
        temps[sp] = compiled.memory_analysis().temp_size_in_bytes
        results[sp] = jax.tree.map(np.asarray, compiled(params, ids))
        if sp:  # the embedding output, the first layer's input, leaves split by sequence over tensor
            with use_mesh_rules(mesh):
                emb = jax.jit(lambda p, i: R1V2(mc).apply({"params": p}, i, method="embed"))(params, ids)
            assert emb.sharding.spec[1] == "tensor"
            assert {s.data.shape[1] for s in emb.addressable_shards} == {512 // 4}
    (l0, g0), (l1, g1) = results[False], results[True]
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g0)
    assert temps[True] < temps[False], temps
