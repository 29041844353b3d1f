"""The Selective Sample Buffer: invariants (hypothesis, against a NumPy model), sampling
statistics, mixing, no host transfers, and an 8-device sharded buffer."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from r1v2_jax.parallel.sharding import make_mesh
from r1v2_jax.rl.ssb import SSBConfig, sampling_weights, ssb_add, ssb_init, ssb_mix, ssb_sample, ssb_shardings
from r1v2_jax.train.run import init_ssb

N = 8  # samples per add


def _payload(ids):
    ids = jnp.asarray(ids, jnp.int32)
    return {"id": ids, "tokens": jnp.stack([ids, ids * 2], axis=1)}


@functools.lru_cache(maxsize=None)
def _jitted(cfg):
    return (jax.jit(functools.partial(ssb_add, cfg=cfg)), jax.jit(functools.partial(ssb_mix, cfg=cfg)))


class RefBuffer:
    """A plain NumPy model of the buffer, entry by entry."""

    def __init__(self, cfg):
        self.cfg, self.items = cfg, []  # dicts: id, adv, age, uses, order

    def add(self, ids, adv):
        c = self.cfg
        for it in self.items:
            it["age"] += 1
        old = [it for it in self.items if it["age"] < c.max_age and it["uses"] < c.reuse_limit]
        new = [dict(id=int(i), adv=float(a), age=0, uses=0) for i, a in zip(ids, adv) if abs(a) > c.threshold]
        pool = [(k, it) for k, it in enumerate(old + new)]
        if c.eviction == "lowest_abs_adv":
            pool.sort(key=lambda kv: (-abs(np.float32(kv[1]["adv"])), kv[0]))
        else:
            pool.sort(key=lambda kv: (kv[1]["age"], kv[0]))
        self.items = [it for _, it in pool[: c.capacity]]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["lowest_abs_adv", "oldest"]),
    st.integers(1, 12),
    st.lists(
        st.lists(st.sampled_from([0.0, 0.0, 0.5, -0.5, 1.0, -1.5, 2.0, 0.25]), min_size=N, max_size=N),
        min_size=1,
        max_size=6,
    ),
    st.integers(1, 3),
    st.integers(1, 5),
)
def test_add_matches_reference_model(eviction, capacity, batches, max_age, reuse_limit):
    cfg = SSBConfig(capacity=capacity, threshold=0.3, eviction=eviction, max_age=max_age, reuse_limit=reuse_limit)
    add, _ = _jitted(cfg)
    state = ssb_init(capacity, _payload(jnp.zeros(N)))
    ref = RefBuffer(cfg)
    next_id = 0
    for adv in batches:
        ids = np.arange(next_id, next_id + N)
        next_id += N
        adv = np.asarray(adv, np.float32)
        state, m = add(state, _payload(ids), jnp.asarray(adv), jnp.asarray(adv) * 2)
        ref.add(ids, adv)
        valid = np.asarray(state.valid)
        assert valid.sum() <= capacity  # capacity never exceeded
        stored_adv = np.asarray(state.advantage)[valid]
        assert (np.abs(stored_adv) > cfg.threshold).all()  # only informative samples
        stored = sorted(zip(np.asarray(state.payload["id"])[valid].tolist(), stored_adv.tolist()))
        assert stored == sorted((it["id"], np.float32(it["adv"]).item()) for it in ref.items)
        # payload rows stay together with their advantage and reward
        np.testing.assert_array_equal(
            np.asarray(state.payload["tokens"])[valid][:, 1], 2 * np.asarray(state.payload["id"])[valid]
        )
        np.testing.assert_array_equal(np.asarray(state.reward)[valid], 2 * stored_adv)


def test_sampling_frequencies_proportional_to_abs_adv_power():
    cfg = SSBConfig(capacity=6, alpha=1.5, threshold=0.0)
    adv = jnp.array([0.5, -1.0, 2.0, 0.0, -3.0, 1.0])
    state, _ = ssb_add(ssb_init(6, _payload(jnp.zeros(6))), _payload(jnp.arange(6)), adv, adv, cfg)
    n = 60_000
    idx, found = jax.jit(lambda s, k: ssb_sample(s, k, n, cfg))(state, jax.random.key(0))
    assert bool(found)
    ids = np.asarray(state.payload["id"])[np.asarray(idx)]
    counts = np.bincount(ids, minlength=6)
    w = np.abs(np.asarray(adv, np.float64)) ** 1.5
    assert counts[3] == 0  # zero advantage never stored, never drawn
    keep = w > 0
    res = stats.chisquare(counts[keep], n * w[keep] / w.sum())
    assert res.pvalue > 1e-3, counts
    np.testing.assert_allclose(np.asarray(sampling_weights(state, cfg)).sum(), w.sum(), rtol=1e-6)


def test_mix_reaches_target_share_and_counts_uses():
    cfg = SSBConfig(capacity=16, target_share=0.75, reuse_limit=2)
    add, mix = _jitted(cfg)
    state = ssb_init(16, _payload(jnp.zeros(8)))
    state, _ = add(state, _payload(jnp.arange(100, 108)), jnp.array([1.0, -1, 2, -2, 0.5, -0.5, 0, 0]), jnp.zeros(8))
    batch_adv = jnp.array([0.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0])
    mixed, mixed_adv, state2, m = mix(state, _payload(jnp.arange(8)), batch_adv, jax.random.key(1))
    assert float(m["effective_share_before"]) == 0.25 and float(m["effective_share_after"]) == 0.75
    assert int(m["ssb_replaced"]) == 4
    ids = np.asarray(mixed["id"])
    assert ids[1] == 1 and ids[5] == 5  # informative batch samples stay in place
    replaced = np.nonzero(ids >= 100)[0]
    np.testing.assert_array_equal(replaced, [0, 2, 3, 4])  # the first zero-advantage slots
    np.testing.assert_array_equal(np.asarray(mixed["tokens"])[replaced, 1], 2 * ids[replaced])
    assert int(np.asarray(state2.uses).sum()) == 4
    # an empty buffer changes nothing
    empty = ssb_init(16, _payload(jnp.zeros(8)))
    mixed, mixed_adv, _, m = mix(empty, _payload(jnp.arange(8)), batch_adv, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(mixed["id"]), np.arange(8))
    assert int(m["ssb_replaced"]) == 0


def test_no_host_transfers_inside_add_sample_mix():
    cfg = SSBConfig(capacity=16)
    add, mix = _jitted(cfg)
    sample = jax.jit(lambda s, k: ssb_sample(s, k, 4, cfg))
    state = ssb_init(16, _payload(jnp.zeros(8)))
    pay, adv, key = _payload(jnp.arange(8)), jnp.linspace(-1, 1, 8), jax.random.key(0)
    jax.block_until_ready((add(state, pay, adv, adv), mix(state, pay, adv, key), sample(state, key)))  # compile
    with jax.transfer_guard("disallow"):
        state, _ = add(state, pay, adv, adv)
        out = mix(state, pay, adv, key)
        idx = sample(state, key)
        jax.block_until_ready((state, out, idx))


def test_sharded_buffer_on_8_devices():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    mesh = make_mesh(2, 2, 2)
    cfg = SSBConfig(capacity=32)
    state = ssb_init(32, _payload(jnp.zeros(16)))
    shard = ssb_shardings(state, mesh)
    sharded = jax.device_put(state, shard)
    assert sharded.advantage.sharding.spec[0] == ("data", "fsdp")
    assert {s.data.shape for s in sharded.advantage.addressable_shards} == {(8,)}
    add = jax.jit(functools.partial(ssb_add, cfg=cfg), out_shardings=(shard, None))
    mix = jax.jit(functools.partial(ssb_mix, cfg=cfg))
    rng = np.random.default_rng(0)
    single = state
    for step in range(4):
        adv = jnp.asarray(rng.choice([0.0, 0.0, 1.0, -2.0, 0.5], 16), jnp.float32)
        pay = _payload(jnp.arange(16) + 16 * step)
        sharded, _ = add(sharded, pay, adv, adv)
        single, _ = ssb_add(single, pay, adv, adv, cfg)
    assert len(sharded.valid.sharding.device_set) == 8
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), sharded, single)
    a = mix(sharded, _payload(jnp.arange(16)), jnp.zeros(16), jax.random.key(3))
    b = ssb_mix(single, _payload(jnp.arange(16)), jnp.zeros(16), jax.random.key(3), cfg)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a[:3], b[:3])


def test_training_makes_the_buffer_sharded_over_the_batch_axes():
    """The trainer's buffer (init_ssb) is born split over data x fsdp, never whole on one device."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    mesh = make_mesh(2, 2, 2)
    example = {
        "tokens": jax.ShapeDtypeStruct((1, 12), jnp.int32),
        "old_logp": jax.ShapeDtypeStruct((1, 12), jnp.float32),
    }
    state = init_ssb(types.SimpleNamespace(mesh=mesh), 32, example)
    for x in jax.tree.leaves(state):
        assert x.sharding.spec[0] == ("data", "fsdp") and len(x.sharding.device_set) == 8
        assert {s.data.shape[0] for s in x.addressable_shards} == {8}
    np.testing.assert_array_equal(np.asarray(state.payload["tokens"]), np.zeros((32, 12), np.int32))
    assert init_ssb(types.SimpleNamespace(mesh=None), 32, example).payload["tokens"].shape == (32, 12)
