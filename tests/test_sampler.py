"""The rollout sampler: token-exact greedy parity with transformers, log-probs, sampling
statistics, group sampling, stopping, sharding, bucketing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats
from torch_ref import internvl_reference, write_released

import r1v2_jax
from r1v2_jax.model.config import model_config
from r1v2_jax.parallel.sharding import make_mesh
from r1v2_jax.sampling.sampler import Sampler, SamplingParams, generate, process_logits, sample_step

pytestmark = pytest.mark.slow  # minutes of compiling or a server: the fast lane (-m "not slow") skips it


@pytest.fixture(scope="module", params=[0, 1])
def pair(request, tmp_path_factory):
    cfg = model_config("tiny")
    ref = internvl_reference(cfg, seed=20 + request.param)
    d = str(tmp_path_factory.mktemp("gen"))
    write_released(ref, cfg, d)
    return cfg, ref, r1v2_jax.load_pretrained(d), request.param


def _prompt(cfg, rng, batch, seq, image):
    ids = rng.integers(0, cfg.image_token_id - 1, (batch, seq))
    pix = None
    if image:
        n = cfg.tokens_per_tile()
        ids[:, 2 : 2 + n] = cfg.image_token_id
        pix = rng.standard_normal((batch, 3, cfg.tile_size, cfg.tile_size)).astype(np.float32)
    return ids, pix


@pytest.mark.parametrize("image", [False, True])
def test_greedy_equals_transformers_generate(pair, image):
    cfg, ref, m, seed = pair
    ids, pix = _prompt(cfg, np.random.default_rng(seed), batch=2, seq=13, image=image)
    out = generate(m, ids, pixel_values=pix, max_new_tokens=64)
    kw = {} if pix is None else {"pixel_values": torch.tensor(pix)}
    with torch.no_grad():
        theirs = ref.generate(
            input_ids=torch.tensor(ids), do_sample=False, max_new_tokens=64, min_new_tokens=64, **kw
        ).numpy()
    np.testing.assert_array_equal(np.asarray(out.tokens), theirs)
    assert np.asarray(out.lengths).tolist() == [64, 64]


def _full_forward_logprobs(m, out, pix=None):
    """log_softmax of a full uncached forward over prompt + completion, at the completion."""
    tokens = np.asarray(out.tokens)
    n, total = tokens.shape
    gen = out.logprobs.shape[1]
    t = total - gen
    plen = np.asarray(out.prompt_lengths)
    mask = np.zeros((n, total), np.int32)
    for i in range(n):
        mask[i, t - plen[i] : t + int(out.lengths[i])] = 1
    logits = np.asarray(m(np.where(mask == 1, tokens, 0), pix, attention_mask=mask), np.float64)
    return logits[:, t - 1 : total - 1], tokens[:, t:], mask


def test_logprobs_match_a_full_forward(pair):
    cfg, _, m, seed = pair
    ids = [
        list(np.random.default_rng(seed).integers(0, 200, 9)),
        list(np.random.default_rng(seed + 1).integers(0, 200, 5)),
    ]
    out = generate(m, ids, max_new_tokens=12, temperature=0.8, repetition_penalty=1.3, num_samples=2, seed=seed)
    logits, gen, mask = _full_forward_logprobs(m, out)
    lsm = logits - jax.nn.logsumexp(logits, -1, keepdims=True)
    ref_lp = np.take_along_axis(lsm, gen[..., None], -1)[..., 0]
    valid = np.asarray(out.completion_mask)
    np.testing.assert_allclose(np.asarray(out.ref_logprobs)[valid], ref_lp[valid], atol=1e-4)
    # Sampling distribution: penalty over tokens seen so far (prompt + earlier completion), then T.
    tokens = np.asarray(out.tokens)
    t = tokens.shape[1] - gen.shape[1]
    for i in range(tokens.shape[0]):
        for j in range(int(out.lengths[i])):
            seen = set(tokens[i, t - int(out.prompt_lengths[i]) : t + j].tolist())
            x = logits[i, j].copy()
            for s in seen:
                x[s] = x[s] / 1.3 if x[s] > 0 else x[s] * 1.3
            x = x / 0.8
            lp = x - jax.nn.logsumexp(x)
            assert abs(float(lp[gen[i, j]]) - float(out.logprobs[i, j])) <= 1e-4


def test_cached_decode_equals_uncached(pair):
    cfg, _, m, seed = pair
    ids, pix = _prompt(cfg, np.random.default_rng(seed + 5), batch=1, seq=10, image=True)
    out = generate(m, ids, pixel_values=pix, max_new_tokens=10)
    seq = ids
    for _ in range(10):  # uncached: a full forward per token
        seq = np.concatenate([seq, np.asarray(m(seq, pix))[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(np.asarray(out.tokens), seq)
    # Cached ref log-probs equal the uncached forward's.
    logits, gen, _ = _full_forward_logprobs(m, out, pix)
    lsm = logits - jax.nn.logsumexp(logits, -1, keepdims=True)
    np.testing.assert_allclose(
        np.asarray(out.ref_logprobs), np.take_along_axis(lsm, gen[..., None], -1)[..., 0], atol=1e-4
    )


def test_ragged_batch_equals_single_prompts(pair):
    cfg, _, m, seed = pair
    rng = np.random.default_rng(seed + 7)
    a, b = list(rng.integers(0, 200, 11)), list(rng.integers(0, 200, 4))
    both = generate(m, [a, b], max_new_tokens=8)
    for i, p in enumerate([a, b]):
        alone = generate(m, [p], max_new_tokens=8)
        np.testing.assert_array_equal(np.asarray(both.tokens)[i, -8:], np.asarray(alone.tokens)[0, -8:])


def _expected(logits, sp, presence=None):
    x = np.asarray(
        process_logits(jnp.asarray(logits)[None], None if presence is None else jnp.asarray(presence)[None], sp)
    )[0].astype(np.float64)
    p = np.exp(x - x.max())
    return p / p.sum()


def _reference_probs(logits, temperature, top_k, top_p, penalty=1.0, presence=None):
    """The distribution written out independently in numpy (transformers' definitions)."""
    x = np.asarray(logits, np.float64).copy()
    if presence is not None:
        x = np.where(presence, np.where(x > 0, x / penalty, x * penalty), x)
    x = x / temperature
    if top_k:
        kth = np.sort(x)[-top_k]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(p)  # ascending, as transformers
        cum = np.cumsum(p[order])
        remove = cum <= 1 - top_p
        remove[-1] = False
        p[order[remove]] = 0
        p /= p.sum()
    return p


@pytest.mark.parametrize(
    "temperature,top_k,top_p,penalty",
    [(0.7, 5, 1.0, 1.0), (1.3, 0, 0.8, 1.0), (1.0, 6, 0.9, 1.0), (1.0, 0, 1.0, 1.0), (0.6, 0, 0.95, 1.05)],
)
def test_sampling_statistics_chi_square(temperature, top_k, top_p, penalty):
    logits = np.array([2.0, 1.5, 1.2, 1.0, 0.7, 0.5, 0.1, -0.3, -0.8, -1.5, -2.0, -3.0], np.float32)
    presence = np.zeros(12, bool)
    presence[[0, 3, 9]] = True
    sp = SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    expected = _reference_probs(logits, temperature, top_k, top_p, penalty, presence if penalty != 1 else None)
    np.testing.assert_allclose(_expected(logits, sp, presence if penalty != 1 else None), expected, atol=1e-6)
    n = 40_000
    keys = jax.random.split(jax.random.key(123), n)
    draw = jax.jit(
        lambda k: sample_step(jnp.broadcast_to(logits, (n, 12)), jnp.broadcast_to(presence, (n, 12)), k, sp)[0]
    )
    counts = np.bincount(np.asarray(draw(keys)), minlength=12)
    support = expected > 0
    assert counts[~support].sum() == 0  # truncated tokens are never drawn
    res = stats.chisquare(counts[support], n * expected[support])
    assert res.pvalue > 1e-3, (counts, n * expected)


def test_group_sampling_prefills_once_and_samples_differ(pair):
    cfg, _, m, seed = pair
    ids, pix = _prompt(cfg, np.random.default_rng(seed + 9), batch=2, seq=12, image=True)
    sampler = Sampler(m)
    sp = SamplingParams(max_new_tokens=16, temperature=1.0)
    out = sampler(ids, pixel_values=pix, sp=sp, num_samples=8, seed=3)
    assert sampler.prefill_batches == [2]  # the prompts (and images) ran once, not 16 times
    tokens = np.asarray(out.tokens)
    assert tokens.shape == (16, 12 + 16)
    for b in range(2):
        group = {tuple(r) for r in tokens[b * 8 : (b + 1) * 8, 12:]}
        assert len(group) == 8
        np.testing.assert_array_equal(tokens[b * 8 : (b + 1) * 8, :12], np.repeat(ids[b : b + 1], 8, 0))
    again = sampler(ids, pixel_values=pix, sp=sp, num_samples=8, seed=3)
    np.testing.assert_array_equal(np.asarray(again.tokens), tokens)  # reproducible per seed
    assert sampler.num_compiles == 2  # one prefill and one decode program, compiled once


def test_eos_stops_and_pads(pair):
    cfg, _, m, seed = pair
    ids = np.random.default_rng(seed + 11).integers(0, 200, (1, 8))
    free = np.asarray(generate(m, ids, max_new_tokens=12).tokens)[0, 8:]
    stop = int(free[4])
    k = int(np.argmax(free == stop))  # first occurrence
    out = generate(m, ids, max_new_tokens=12, eos_ids=[stop, 9999 % cfg.text.vocab_size], pad_id=0)
    assert int(out.lengths[0]) == k + 1 and bool(out.finished[0])
    gen = np.asarray(out.tokens)[0, 8:]
    np.testing.assert_array_equal(gen[: k + 1], free[: k + 1])
    assert (gen[k + 1 :] == 0).all() and (np.asarray(out.ref_logprobs)[0, k + 1 :] == 0).all()


def test_bucketing_reuses_compilations(pair):
    cfg, _, m, _ = pair
    sampler = Sampler(m, bucket=16)
    sp = SamplingParams(max_new_tokens=4)
    for t in (5, 9, 16):
        sampler(np.ones((1, t), np.int32), sp=sp)
    assert sampler.num_compiles == 2  # prefill + decode for the 16-token bucket
    sampler(np.ones((1, 17), np.int32), sp=sp)
    assert sampler.num_compiles == 4  # and for the 32-token bucket
    # new parameters of the same shapes: nothing recompiles
    sampler.set_params(jax.tree.map(lambda x: x * 0.5, m.params))
    sampler(np.ones((1, 17), np.int32), sp=sp)
    assert sampler.num_compiles == 4


def test_generate_does_not_keep_models_alive(pair):
    import gc
    import weakref

    cfg, _, m, _ = pair
    model = r1v2_jax.R1V2Model(cfg, jax.tree.map(jnp.copy, m.params))
    generate(model, np.ones((1, 4), np.int32), max_new_tokens=2)
    assert model._sampler.num_compiles == 2
    generate(model, np.ones((1, 5), np.int32), max_new_tokens=2)
    assert model._sampler.num_compiles == 2  # the model's sampler is reused
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_sharded_sampling_equals_single_device(pair):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    cfg, _, m, seed = pair
    mesh = make_mesh(2, 2, 2)
    sharded = r1v2_jax.R1V2Model(
        cfg, jax.tree.map(lambda x, s: jax.device_put(x, s), m.params, r1v2_jax.param_shardings(cfg, mesh)), mesh
    )
    ids, pix = _prompt(cfg, np.random.default_rng(seed + 13), batch=2, seq=12, image=True)
    a = generate(m, ids, pixel_values=pix, max_new_tokens=12, temperature=0.9, num_samples=2, seed=1)
    b = generate(sharded, ids, pixel_values=pix, max_new_tokens=12, temperature=0.9, num_samples=2, seed=1)
    assert len(b.tokens.sharding.device_set) == 8 or len(b.logprobs.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.ref_logprobs), np.asarray(b.ref_logprobs), atol=1e-5)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def _stacked_weight_copies(sampler, m, layer_loop):
    """Instructions of the compiled decode program that produce a tensor shaped like one layer's
    weight matrix other than the parameters themselves (copies / dynamic-slices of weights)."""
    import re

    from r1v2_jax.sampling.sampler import _left_pad

    sp = SamplingParams(max_new_tokens=4)
    ids, mask, _ = _left_pad(np.ones((2, 8), np.int32), None, sampler.bucket, 0)
    logits, cache, kv_valid, rep = sampler.decode_inputs(
        m.params, jnp.asarray(ids), jnp.asarray(mask), None, cache_len=64, num_samples=1
    )
    hlo = (
        sampler.lower_decode(
            sampler.decode_params(),
            logits,
            cache,
            kv_valid,
            rep,
            jax.ShapeDtypeStruct((), jnp.uint32),
            jax.ShapeDtypeStruct((2,), jnp.int32),
            num_samples=1,
            sp=sp,
        )
        .compile()
        .as_text()
    )
    block = m.params["language_model"]["layers"]["block"]
    shapes = {",".join(map(str, a.shape[1:])) for a in jax.tree.leaves(block) if a.ndim == 3}
    found = []
    for line in hlo.splitlines():
        hit = re.search(r"= f32\[([0-9,]+)\]\{[^}]*\} (\S+)\(", line)
        if (
            hit
            and hit.group(1) in shapes
            and hit.group(2) not in ("parameter", "get-tuple-element", "bitcast", "dot", "tuple")
        ):
            found.append(line.strip()[:120])
    return found


def test_unrolled_decode_reads_weights_in_place(pair):
    """The default decode program never copies a layer's weights out of the stacked arrays
    (the scanned one does, at every step: issue #16 point 6)."""
    _, _, m, _ = pair
    assert _stacked_weight_copies(Sampler(m), m, "unrolled") == []
    assert _stacked_weight_copies(Sampler(m, layer_loop="scan"), m, "scan")  # the check can fail


def test_unrolled_decode_equals_scanned(pair):
    cfg, _, m, seed = pair
    ids, pix = _prompt(cfg, np.random.default_rng(seed + 15), batch=2, seq=12, image=True)
    sp = SamplingParams(max_new_tokens=12, temperature=0.9, repetition_penalty=1.1)
    a = Sampler(m)(ids, pixel_values=pix, sp=sp, num_samples=2, seed=4)
    b = Sampler(m, layer_loop="scan")(ids, pixel_values=pix, sp=sp, num_samples=2, seed=4)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.ref_logprobs), np.asarray(b.ref_logprobs), atol=1e-5)
    with pytest.raises(ValueError, match="layer_loop"):
        Sampler(m, layer_loop="fast")
