"""Scan vs unrolled layers, remat, sharded execution on an 8-device CPU mesh, and the 38B
model checked abstractly (nothing materialised)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import r1v2_jax
from r1v2_jax.convert import keymap
from r1v2_jax.model.config import VisionConfig, model_config
from r1v2_jax.model.vlm import R1V2, R1V2Model, abstract_params, init_params, param_shardings
from r1v2_jax.parallel.sharding import logical_to_pspec, make_mesh

TOL = 1e-5


pytestmark = pytest.mark.slow  # minutes of compiling or a server: the fast lane (-m "not slow") skips it


def _inputs(cfg, seed=0, batch=2, seq=20):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.image_token_id - 1, (batch, seq))
    n = cfg.tokens_per_tile()
    for b in range(batch):
        ids[b, 2 + b : 2 + b + n] = cfg.image_token_id
    pix = rng.standard_normal((batch, 3, cfg.tile_size, cfg.tile_size)).astype(np.float32)
    return ids, pix


@pytest.fixture(scope="module")
def tiny():
    cfg = model_config("tiny")
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(3)))
    # Make norms and layer scales non-trivial so a wrong layout cannot hide behind ones.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            x * (1.0 + 0.3 * np.random.default_rng(len(str(p))).standard_normal(x.shape)).astype(x.dtype)
            if any(getattr(k, "key", None) in ("scale", "ls1", "ls2") for k in p)
            else x
        ),
        params,
    )
    return cfg, params


def test_scan_equals_unrolled(tiny):
    cfg, params = tiny
    ids, pix = _inputs(cfg)
    scanned = R1V2Model(cfg, params)(ids, pix)
    ucfg = cfg.replace(scan_layers=False)
    unrolled = R1V2Model(ucfg, keymap.stack_layout(params, cfg, scan=False))(ids, pix)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(unrolled), atol=TOL, rtol=0)


@pytest.mark.parametrize("policy", ["full", "dots", "save_qkv_attn"])
def test_remat_policies_same_loss_and_grads(tiny, policy):
    cfg, params = tiny
    ids, pix = _inputs(cfg, seed=1)

    def loss(p, c):
        logits = R1V2(c).apply({"params": p}, jnp.asarray(ids), jnp.asarray(pix))
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    l0, g0 = jax.jit(jax.value_and_grad(functools.partial(loss, c=cfg)))(params)
    l1, g1 = jax.jit(jax.value_and_grad(functools.partial(loss, c=cfg.replace(remat_policy=policy))))(params)
    np.testing.assert_allclose(l1, l0, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), g1, g0)


@pytest.mark.parametrize("scan", [True, False])
def test_select_layer_uses_first_layers(scan):
    """select_layer=-2 on a 3-layer ViT == the same model with only its first 2 ViT layers."""
    v3 = VisionConfig(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, image_size=56, patch_size=14)
    cfg3 = model_config("tiny").replace(vision=v3, select_layer=-2, scan_layers=scan)
    cfg2 = cfg3.replace(vision=v3.__class__(**{**v3.__dict__, "num_layers": 2}), select_layer=-1)
    assert cfg3.vision_layers_used == 2
    p3 = jax.tree.map(np.asarray, init_params(cfg3, jax.random.key(0)))
    rel = dict(keymap.params_to_released(p3, cfg3))
    rel2 = {k: v for k, v in rel.items() if ".layers.2." not in k or not k.startswith("vision_model")}
    p2 = keymap.released_to_params(rel2.__getitem__, {k: v.shape for k, v in rel2.items()}, cfg2)
    ids, pix = _inputs(cfg3)
    np.testing.assert_allclose(
        np.asarray(R1V2Model(cfg3, p3)(ids, pix)), np.asarray(R1V2Model(cfg2, p2)(ids, pix)), atol=TOL, rtol=0
    )


def test_sharded_forward_on_8_devices_equals_single_device(tiny):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    cfg, params = tiny
    ids, pix = _inputs(cfg, seed=2, batch=4)
    single = np.asarray(R1V2Model(cfg, jax.tree.map(jnp.asarray, params))(ids, pix))
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shardings = param_shardings(cfg, mesh)
    sharded = jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)
    # Parameters are really split: each device holds a quarter of an MLP kernel.
    k = sharded["language_model"]["layers"]["block"]["mlp"]["gate_proj"]["kernel"]
    assert k.sharding.spec == P(None, "fsdp", "tensor")
    assert {s.data.shape for s in k.addressable_shards} == {(2, 24, 48)}
    assert len(k.sharding.device_set) == 8
    model = R1V2Model(cfg, sharded, mesh)
    out = model(ids, pix)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), single, atol=TOL, rtol=0)


def test_rules_refuse_a_mesh_axis_twice():
    with pytest.raises(ValueError, match="mesh axis 'tensor' is used twice"):
        logical_to_pspec(("heads", "mlp"))
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_pspec(("nonsense",))
    assert logical_to_pspec(("act_batch", "act_len", "act_embed")) == P(("data", "fsdp"), None, None)


# --- the real size, abstractly ------------------------------------------------------------


@pytest.fixture(scope="module")
def abstract_38b():
    cfg = model_config("r1v2_38b")
    return cfg, abstract_params(cfg, boxed=False)


def _vit_params(v):
    d, m = v.hidden_size, v.intermediate_size
    layer = d * 3 * d + 2 * d + d * d + d + d * m + m + m * d + d + 2 * d + 2 * d
    emb = d + v.patch_size**2 * v.num_channels * d + d + v.num_positions * d
    return emb + v.num_layers * layer


def _llm_params(t):
    h, i, hd = t.hidden_size, t.intermediate_size, t.resolved_head_dim
    q, kv = t.num_heads * hd, t.num_kv_heads * hd
    layer = h * q + q + 2 * (h * kv + kv) + q * h + 3 * h * i + 2 * h
    return 2 * t.vocab_size * h + h + t.num_layers * layer


def test_38b_parameter_counts_without_materialising(abstract_38b):
    cfg, ap = abstract_38b
    leaves = jax.tree.leaves(ap)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    vit = r1v2_jax.count_params(ap["vision_model"])
    adapter = r1v2_jax.count_params(ap["mlp1"])
    llm = r1v2_jax.count_params(ap["language_model"])
    assert vit == _vit_params(cfg.vision) and 5.45e9 < vit < 5.6e9  # ViT ~5.5B
    assert adapter == 2 * 12800 + 12800 * 5120 + 5120 + 5120 * 5120 + 5120 and 0.085e9 < adapter < 0.095e9
    assert llm == _llm_params(cfg.text) and 32.7e9 < llm < 32.85e9  # LLM ~32.8B
    assert 38.2e9 < vit + adapter + llm < 38.5e9
    assert ap["language_model"]["layers"]["block"]["mlp"]["up_proj"]["kernel"].shape == (64, 5120, 27648)
    assert ap["vision_model"]["layers"]["block"]["attn"]["qkv"]["kernel"].shape == (45, 3200, 9600)


def test_38b_forward_lowers_sharded_on_a_mesh(abstract_38b):
    """The full-size forward traces and lowers with real shardings on a 2x2x2 mesh."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    cfg, ap = abstract_38b
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shardings = param_shardings(cfg, mesh)
    assert shardings["language_model"]["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")
    args = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), ap, shardings)
    model = R1V2Model(cfg, args, mesh)
    seq = cfg.tokens_per_tile() + 64
    ids = jax.ShapeDtypeStruct((4, seq), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    pix = jax.ShapeDtypeStruct((1, 3, 448, 448), jnp.float32)
    lowered = model._forward.lower(args, ids, pix, None)
    out = lowered.out_info
    assert out.shape == (4, seq, 152064)
