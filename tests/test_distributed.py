"""The multi-host helpers in one process (8 devices): rows to global arrays and back, the
sampler's padded row blocks, logs kept beside a separate checkpoint folder. The two-process
run is tests/test_multihost.py."""

import json
import os

import jax
import numpy as np
import pytest

from r1v2_jax.model.config import model_config
from r1v2_jax.model.vlm import R1V2Model, init_params, param_shardings
from r1v2_jax.parallel import multihost as dist
from r1v2_jax.parallel.sharding import make_mesh
from r1v2_jax.sampling.sampler import Sampler, SamplingParams
from r1v2_jax.train.checkpoints import sync_logs
from r1v2_jax.train.metrics_log import MetricsLog


def test_rows_round_trip_and_indivisible_batches():
    mesh = make_mesh(2, 2, 2)
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    g = dist.global_rows(x, mesh)
    assert g.shape == (8, 3) and {s.data.shape for s in g.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(dist.local_rows(g), x)
    np.testing.assert_array_equal(dist.local_rows(jax.numpy.asarray(x)), x)
    with pytest.raises(ValueError, match=r"6 rows .* data x fsdp = 4 devices.*data.batch_size"):
        dist.global_rows(x[:6], mesh)
    rows, mine = dist.gather_rows(x[:, 0])
    np.testing.assert_array_equal(rows[mine], x[:, 0])
    assert dist.allgather_json({"a": 1}) == [{"a": 1}] and dist.agree_max(3) == 3 and dist.total(2.5) == 2.5


def test_sampler_pads_row_blocks_and_matches_one_device():
    cfg = model_config("tiny")
    params = init_params(cfg, jax.random.key(0))
    mesh = make_mesh(2, 2, 2)
    sharded = R1V2Model(cfg, jax.device_put(params, param_shardings(cfg, mesh)), mesh)
    rng = np.random.default_rng(0)
    n = cfg.tokens_per_tile()
    ids = rng.integers(0, cfg.image_token_id - 1, (3, 12))  # 3 prompts over 4 row shards: padded to 4
    ids[:, 2 : 2 + n] = cfg.image_token_id
    pix = rng.standard_normal((3, 1, 3, cfg.tile_size, cfg.tile_size)).astype(np.float32)
    sp = SamplingParams(max_new_tokens=6, temperature=1.0)
    a = Sampler(R1V2Model(cfg, params))(ids, pixel_values=pix, sp=sp, num_samples=2, seed=3)
    b = Sampler(sharded)(ids, pixel_values=pix, sp=sp, num_samples=2, seed=3)
    assert b.tokens.shape == a.tokens.shape == (6, 12 + 6) and b.host_rows is None  # padding dropped
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.ref_logprobs), np.asarray(b.ref_logprobs), atol=1e-5)
    loc = b.host_local()
    np.testing.assert_array_equal(loc.tokens, np.asarray(a.tokens))


def test_logs_follow_a_separate_checkpoint_dir(tmp_path):
    ckpt = str(tmp_path / "bucket" / "checkpoints")
    first = str(tmp_path / "vm1")
    log = MetricsLog(first, tensorboard=False)
    log.write({"stage": "grpo", "step": 1, "loss": 0.5})
    sync_logs(first, ckpt)
    assert os.path.exists(os.path.join(ckpt, "logs", "metrics.jsonl"))
    second = str(tmp_path / "vm2")  # a new machine with an empty run_dir
    sync_logs(second, ckpt, pull=True)
    with open(os.path.join(second, "metrics.jsonl")) as f:
        assert [json.loads(x)["loss"] for x in f] == [0.5]
    # a run_dir that has its own log keeps it
    MetricsLog(second, tensorboard=False).write({"stage": "grpo", "step": 2, "loss": 0.25})
    sync_logs(second, ckpt, pull=True)
    assert len(MetricsLog(second, tensorboard=False).rows()) == 2
    # only process 0 writes or truncates the log
    other = MetricsLog(second, tensorboard=False, is_main=False)
    other.write({"stage": "grpo", "step": 3})
    other.truncate(0, "grpo")
    assert len(MetricsLog(second, tensorboard=False).rows()) == 2
