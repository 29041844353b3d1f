"""The paged rollout engine: exactness against transformers and the static sampler, slot- and
order-independence of sampled tokens, log-probs equal to the learner's (ratio 1 in a GRPO
step), page sharing and return, bfloat16 pages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_ref import internvl_reference, write_released

import r1v2_jax
from r1v2_jax.model.config import model_config
from r1v2_jax.model.vlm import R1V2, R1V2Model, param_shardings
from r1v2_jax.parallel.sharding import make_mesh
from r1v2_jax.rl.losses import PolicyLossConfig
from r1v2_jax.sampling.engine import EngineConfig, PagedEngine
from r1v2_jax.sampling.paged import PagePool, page_bucket
from r1v2_jax.sampling.sampler import Sampler, SamplingParams
from r1v2_jax.train.rollout import grpo_batch
from r1v2_jax.train.steps import grpo_loss_fn

pytestmark = pytest.mark.slow  # minutes of compiling or a server: the fast lane (-m "not slow") skips it


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cfg = model_config("tiny")
    ref = internvl_reference(cfg, seed=31)
    d = str(tmp_path_factory.mktemp("engine"))
    write_released(ref, cfg, d)
    return cfg, ref, r1v2_jax.load_pretrained(d)


def _prompts(seed, lengths=(5, 19, 11)):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, 200, n)) for n in lengths]


def _image_prompts(cfg, seed, batch=2, seq=14):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.image_token_id - 1, (batch, seq))
    ids[:, 2 : 2 + cfg.tokens_per_tile()] = cfg.image_token_id
    pix = rng.standard_normal((batch, 1, 3, cfg.tile_size, cfg.tile_size)).astype(np.float32)
    return ids, pix


def test_greedy_equals_transformers_and_the_static_sampler(pair):
    cfg, ref, m = pair
    ids, pix = _image_prompts(cfg, 1)
    sp = SamplingParams(max_new_tokens=40)
    out = PagedEngine(m, EngineConfig(slots=2, steps_per_sync=5, page_size=8))(ids, pixel_values=pix, sp=sp)
    with torch.no_grad():
        theirs = ref.generate(
            input_ids=torch.tensor(ids),
            pixel_values=torch.tensor(pix[:, 0]),
            do_sample=False,
            max_new_tokens=40,
            min_new_tokens=40,
        ).numpy()
    np.testing.assert_array_equal(np.asarray(out.tokens), theirs)
    static = Sampler(m)(ids, pixel_values=pix, sp=sp)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(static.tokens))
    np.testing.assert_allclose(np.asarray(out.ref_logprobs), np.asarray(static.ref_logprobs), atol=1e-5)


@pytest.mark.parametrize(
    "sp",
    [
        SamplingParams(max_new_tokens=24, temperature=1.0, eos_ids=(3, 7, 11, 13, 17, 19, 23, 29, 31, 37)),
        SamplingParams(max_new_tokens=16, temperature=0.8, top_k=30, top_p=0.9, repetition_penalty=1.2),
    ],
)
def test_sampled_tokens_do_not_depend_on_slots_order_or_pages(pair, sp):
    """Per-sample keys: the same seed gives the same samples (== the static sampler's) whatever
    the slot count, the queue order, the sync interval and the page size."""
    _, _, m = pair
    prompts = _prompts(2)
    static = Sampler(m)(prompts, sp=sp, num_samples=4, seed=9)
    n = 3 * 4
    runs = [
        (EngineConfig(slots=1, steps_per_sync=4, page_size=4), None),
        (EngineConfig(slots=5, steps_per_sync=3, page_size=8), np.random.default_rng(0).permutation(n)),
        (EngineConfig(slots=16, steps_per_sync=8, page_size=16), n - 1 - np.arange(n)),
    ]
    for cfg, order in runs:
        eng = PagedEngine(m, cfg)
        out = eng(prompts, sp=sp, num_samples=4, seed=9, order=order)
        for f in ("tokens", "lengths", "finished", "prompt_lengths"):
            np.testing.assert_array_equal(np.asarray(getattr(out, f)), np.asarray(getattr(static, f)), err_msg=f)
        for f in ("logprobs", "ref_logprobs"):
            np.testing.assert_allclose(np.asarray(getattr(out, f)), np.asarray(getattr(static, f)), atol=1e-5)
        assert eng.stats["pages_in_use_at_end"] == 0  # every page went back
    if sp.eos_ids:
        assert 0 < np.asarray(static.finished).sum() < n  # the workload is ragged: some stop early


def test_logprobs_equal_the_learners_ratio_one_in_a_grpo_step(pair):
    """The model log-probs the engine returns equal the learner's recomputation (a full
    forward over prompt + completion) within 1e-5: the GRPO step's ratios are 1."""
    cfg, _, m = pair
    ids, pix = _image_prompts(cfg, 3)
    sp = SamplingParams(max_new_tokens=20, temperature=1.0, eos_ids=(5, 9, 40, 77, 120))
    out = PagedEngine(m, EngineConfig(slots=3, steps_per_sync=4, page_size=8))(
        ids, pixel_values=pix, sp=sp, num_samples=3, seed=1
    )
    batch = grpo_batch(out, pix, 3)
    batch["advantages"] = np.linspace(-1, 1, len(batch["tokens"])).astype(np.float32)
    batch = jax.tree.map(jnp.asarray, batch)
    _, metrics = jax.jit(lambda p, b: grpo_loss_fn(PolicyLossConfig(), R1V2(m.config), p, b, None, None))(
        m.params, batch
    )
    assert abs(float(metrics["ratio_max"]) - 1) <= 1e-5 and abs(float(metrics["ratio_min"]) - 1) <= 1e-5


def test_prompt_pages_are_shared_and_copied_on_write(pair):
    """G samples of a 20-token prompt in pages of 8: two full pages shared, the third (where
    the samples diverge) copied once per sample; nothing per sample for a 16-token prompt."""
    _, _, m = pair
    sp = SamplingParams(max_new_tokens=4, temperature=1.0)
    for length, per_sample in ((20, 1), (16, 1)):
        eng = PagedEngine(m, EngineConfig(slots=8, steps_per_sync=4, page_size=8, bucket=8))
        eng([list(range(1, length + 1))], sp=sp, num_samples=8)
        prompt = -(-length // 8)
        # the prompt's pages once, then per sample: the copied divergence page (20) or the
        # first generation page (16), the 4 new tokens fitting in it
        assert eng.stats["peak_pages"] == prompt + 8 * per_sample
        assert eng.stats["cow_copies"] == (8 if length % 8 else 0)


def test_bfloat16_pages(pair):
    """bfloat16 KV pages (half the pool): greedy tokens stay those of float32 pages on the test
    model and the model log-probs move by at most 2e-2 (the stated tolerance)."""
    _, _, m = pair
    prompts = _prompts(4)
    sp = SamplingParams(max_new_tokens=16)
    a = PagedEngine(m, EngineConfig(slots=4, page_size=8))(prompts, sp=sp)
    eng = PagedEngine(m, EngineConfig(slots=4, page_size=8, kv_dtype="bfloat16"))
    b = eng(prompts, sp=sp)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(b.ref_logprobs), np.asarray(a.ref_logprobs), atol=2e-2)
    assert eng.stats["page_bytes"] * 2 == PagedEngine(m, EngineConfig(page_size=8)).page_bytes()


def test_page_pool_and_bad_settings(pair):
    _, _, m = pair
    pool = PagePool(6)
    a = pool.alloc(3)
    assert a == [1, 2, 3] and pool.free == 2
    pool.share(a[:2])
    pool.release(a)
    assert pool.alloc(1) == [3] and pool.peak == 3
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.alloc(5)
    with pytest.raises(RuntimeError, match="not held"):
        pool.release([4])
    assert [page_bucket(n, 12) for n in (1, 3, 4, 9, 13)] == [1, 4, 4, 12, 12]
    with pytest.raises(ValueError, match="EngineConfig.slots"):
        EngineConfig(slots=0)
    with pytest.raises(ValueError, match="kv_dtype"):
        EngineConfig(kv_dtype="int8")
    with pytest.raises(ValueError, match="num_pages"):
        PagedEngine(m, EngineConfig(num_pages=3, page_size=4))([[1, 2, 3]], sp=SamplingParams(max_new_tokens=16))
    with pytest.raises(ValueError, match="order"):
        PagedEngine(m)([[1, 2]], sp=SamplingParams(max_new_tokens=2), num_samples=2, order=[0, 0])


def test_trainer_rollouts_through_the_engine(pair, tmp_path):
    """Run.sampler gives the engine when ``engine`` is set; a training rollout through it equals
    the static sampler's (same per-sample keys), so switching engines changes no result."""
    from r1v2_jax.train.rollout import rollout
    from r1v2_jax.train.run import Run

    cfg, _, m = pair
    ids = np.random.default_rng(6).integers(0, 200, (3, 10)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    mask[1, :4] = False
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "num_tiles": np.zeros(3, np.int32),
        "pixel_values": np.zeros((0, 3, cfg.tile_size, cfg.tile_size), np.float32),
    }
    sp = SamplingParams(max_new_tokens=12, temperature=1.0, eos_ids=(5, 9, 40, 77, 120))
    outs = []
    for engine in (EngineConfig(slots=4, steps_per_sync=4, page_size=8), None):
        run = Run(m.config, None, None, str(tmp_path), None, engine=engine)
        sampler = run.sampler(m.params)
        assert isinstance(sampler, PagedEngine) == (engine is not None)
        outs.append(rollout(run, sampler, m.params, batch, sp, 4, jax.random.key(3))[0])
    for f in ("tokens", "lengths", "finished", "prompt_lengths"):
        np.testing.assert_array_equal(np.asarray(getattr(outs[0], f)), np.asarray(getattr(outs[1], f)), err_msg=f)
    np.testing.assert_allclose(np.asarray(outs[0].ref_logprobs), np.asarray(outs[1].ref_logprobs), atol=1e-5)
    # with a mesh (the learner's, no sampler mesh) the run's engine runs on it
    mesh = make_mesh(2, 1, 2, devices=jax.devices()[:4])
    run = Run(m.config, None, None, str(tmp_path), None, mesh=mesh, engine=EngineConfig(slots=4))
    eng = run.sampler(jax.device_put(m.params, param_shardings(m.config, mesh)))
    assert isinstance(eng, PagedEngine) and eng.model.mesh is mesh and eng.layout.shards == 2


@pytest.mark.parametrize("shape", [(4, 1, 2), (2, 2, 2), (8, 1, 1)])
def test_on_a_mesh_the_samples_are_the_single_devices(pair, shape):
    """On a mesh (slots and page pools split over data x fsdp, KV heads over tensor, every pool
    operation per shard in shard_map), the same seed gives the same samples as on one device,
    and every shard's pages go back; image prompts, a ragged workload."""
    cfg, _, m = pair
    mesh = make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])
    on_mesh = R1V2Model(m.config, jax.device_put(m.params, param_shardings(m.config, mesh)), mesh)
    ids, pix = _image_prompts(cfg, 5, batch=3)
    sp = SamplingParams(max_new_tokens=20, temperature=1.0, eos_ids=(5, 9, 40, 77, 120))
    ec = EngineConfig(slots=8, steps_per_sync=4, page_size=8)
    ref = PagedEngine(m, ec)(ids, pixel_values=pix, sp=sp, num_samples=4, seed=3)
    eng = PagedEngine(on_mesh, ec)
    out = eng(ids, pixel_values=pix, sp=sp, num_samples=4, seed=3)
    for f in ("tokens", "lengths", "finished", "prompt_lengths"):
        np.testing.assert_array_equal(np.asarray(getattr(out, f)), np.asarray(getattr(ref, f)), err_msg=f)
    for f in ("logprobs", "ref_logprobs"):
        np.testing.assert_allclose(np.asarray(getattr(out, f)), np.asarray(getattr(ref, f)), atol=1e-5)
    assert 0 < np.asarray(ref.finished).sum() < 12  # ragged: some samples stop early
    assert eng.stats["shards"] == shape[0] * shape[1] and eng.stats["pages_in_use_at_end"] == 0
    bad = eng.stats["shards"] + 2
    with pytest.raises(ValueError, match=f"EngineConfig.slots: {bad} slots cannot be split"):
        PagedEngine(on_mesh, EngineConfig(slots=bad))


def test_experiment_config_turns_the_engine_on():
    from r1v2_jax.train.config_files import experiment_from
    from r1v2_jax.train.experiment import demo_config

    assert experiment_from(demo_config()).rollout_engine.engine() is None  # off by default: the static sampler
    exp = experiment_from(
        demo_config(), "test", ["--config.rollout_engine.enabled=true", "--config.rollout_engine.slots=6"]
    )
    assert exp.rollout_engine.engine() == EngineConfig(slots=6, steps_per_sync=8, page_size=16)
