"""Trainer plumbing: config errors before any compute, restoring a checkpoint onto another mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import r1v2_jax
from r1v2_jax.model.vlm import init_params, param_shardings
from r1v2_jax.parallel.sharding import make_mesh
from r1v2_jax.train.checkpoints import StageCheckpoints
from r1v2_jax.train.config_files import ConfigKeyError, load_config
from r1v2_jax.train.experiment import demo_config, run_experiment
from r1v2_jax.train.metrics_log import MetricsLog
from r1v2_jax.train.run import Run
from r1v2_jax.train.schema import ExperimentError
from r1v2_jax.train.state import OptimConfig, init_state, make_optimizer


def test_unknown_config_key_is_an_error():
    with pytest.raises(ConfigKeyError, match=r"unknown config key 'optim\.lr'"):
        load_config("configs/demo.py", ["--config.optim.lr=1e-6"])
    with pytest.raises(ConfigKeyError, match="did you mean 'grpo.optim'"):
        load_config("configs/grpo_38b.py", ["--config.grpo.optimm.lr=1e-6"])
    with pytest.raises(ValueError, match="sft.steps"):
        load_config("configs/demo.py", ["--config.sft.steps=many"])
    c = load_config("configs/demo.py", ["--config.grpo.use_ssb=false", "--config.stages=('sft',)"])
    assert c.grpo.use_ssb is False and tuple(c.stages) == ("sft",)


def test_missing_and_mismatched_checkpoints_fail_before_compute(tmp_path):
    c = demo_config()
    c.run_dir = str(tmp_path / "run")
    c.model.init = str(tmp_path / "nope")
    with pytest.raises(ExperimentError, match="model.init"):
        run_experiment(c)
    tiny = r1v2_jax.init_model("tiny")
    r1v2_jax.save_released(tiny, str(tmp_path / "tiny"))
    from r1v2_jax.data.tokenizer import tiny_tokenizer

    tiny_tokenizer(255).save(str(tmp_path / "tiny" / "tokenizer.json"))
    c.model.init = str(tmp_path / "tiny")
    c.model.preset = "r1v2_38b"
    with pytest.raises(ValueError, match="holds a different model than preset 'r1v2_38b'"):
        run_experiment(c)
    # the remat policy a checkpoint's model trains with is the config's (config.json has none)
    c.model.preset, c.model.remat_policy = "tiny", "everything"
    with pytest.raises(ValueError, match="remat_policy: expected one of"):
        run_experiment(c)


def test_restore_onto_a_different_mesh(tmp_path):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    cfg = r1v2_jax.model_config("tiny")
    params = init_params(cfg, jax.random.key(0))
    opt = make_optimizer(OptimConfig(trainable="all"), params)
    state = init_state(params, opt, 0)
    run = Run(cfg, None, None, str(tmp_path), MetricsLog(str(tmp_path), False), async_checkpoints=False)
    ck = StageCheckpoints(run, "sft")
    ck.save(3, state.replace(step=jnp.int32(3)), {"grain": {"next_index": 7}}, force=True)
    ck.close()
    mesh = make_mesh(2, 2, 2)
    sh = param_shardings(cfg, mesh)
    target = init_state(jax.tree.map(lambda x, s: jax.device_put(jnp.zeros_like(x), s), params, sh), opt, 1)
    ck = StageCheckpoints(run, "sft")
    restored, data = ck.restore(ck.latest(), target)
    ck.close()
    k = restored.params["language_model"]["layers"]["block"]["mlp"]["up_proj"]["kernel"]
    assert len(k.sharding.device_set) == 8 and {s.data.shape for s in k.addressable_shards} == {(2, 24, 48)}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored.params, params)
    assert int(restored.step) == 3 and data == {"grain": {"next_index": 7}}


@pytest.mark.slow
def test_sampler_on_its_own_mesh_gives_the_same_training(tmp_path):
    """GRPO with the sampler on a data-parallel mesh (parameters resharded before each rollout)
    trains exactly like sampling on the learner's FSDP mesh: same rollouts, rewards, losses."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    import json

    def run(name, *extra):
        c = load_config(
            "configs/demo.py",
            [
                f"--config.run_dir={tmp_path / name}",
                "--config.stages=('grpo',)",
                "--config.grpo.reward_model.kind=none",
                "--config.grpo.steps=2",
                "--config.grpo.group_size=4",
                "--config.grpo.max_new_tokens=8",
                "--config.data.synthetic_n=40",
                "--config.eval.prompts=4",
                "--config.eval.max_new_tokens=8",
                "--config.progress=False",
                "--config.export=False",
                "--config.checkpoint.async_save=False",
                "--config.mesh=(1,8,1)",
                *extra,
            ],
        )
        run_experiment(c)
        with open(tmp_path / name / "metrics.jsonl") as f:
            return [json.loads(line) for line in f]

    same = run("same")
    own = run("own", "--config.sampler_mesh=(4,1,2)")
    assert [r["stage"] for r in same] == [r["stage"] for r in own] and any(r["stage"] == "grpo" for r in same)
    for a, b in zip(same, own):
        for k in a:
            if k.endswith("seconds") or k.endswith("per_s") or not isinstance(a[k], float):
                assert a[k] == b[k] or k.endswith("seconds") or k.endswith("per_s"), k
                continue
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
    with pytest.raises(ValueError, match="sampler_mesh: set mesh too"):
        run_experiment(
            load_config("configs/demo.py", [f"--config.run_dir={tmp_path / 'bad'}", "--config.sampler_mesh=(8,1,1)"])
        )
