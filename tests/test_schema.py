"""The experiment schema: every config mistake is exit code 2 naming the field, for each
command, before any device work; every optimizer / loss / sampler field is settable; and
`r1v2 plan` compiles the very step `r1v2 train` runs."""

import dataclasses

import jax
import numpy as np
import pytest

from r1v2_jax.cli import main
from r1v2_jax.parallel.sharding import make_mesh
from r1v2_jax.train import program as program_mod
from r1v2_jax.train.config_files import experiment_from, load_experiment
from r1v2_jax.train.experiment import demo_config, model_config_from, run_experiment
from r1v2_jax.train.schema import Experiment, ExperimentError, default_config, from_config_dict, to_config_dict
from r1v2_jax.train.stages import STAGES

# (override, the field the message must name): one per mistake class
MISTAKES = [
    ("--config.sft.stpes=1", "sft.stpes"),  # unknown key (with a suggestion)
    ("--config.sft.steps=many", "sft.steps"),  # wrong type
    ("--config.grpo.optim.lr=nan", "lr"),  # lr not finite
    ("--config.grpo.optim.lr=0", "lr"),  # lr <= 0
    ("--config.checkpoint.every=0", "every"),  # every <= 0
    ("--config.stages=('sft','grpoo')", "stages"),  # a stage not in the registry
    ("--config.mesh=(1,8)", "mesh"),  # a mesh of the wrong rank
    ("--config.mesh=(1,3,1)", "mesh"),  # a mesh not dividing the devices
    ("--config.grpo.loss.aggregation=token-sum", "aggregation"),  # a loss field's own check
    ("--config.grpo.temperature=-1", "temperature"),  # a sampler field's own check
]


def _argv(cmd, override, tmp_path):
    if cmd == "demo":
        return ["demo", "--out", str(tmp_path / "demo"), override]
    if cmd == "train":
        return ["train", "--config", "configs/demo.py", f"--config.run_dir={tmp_path / 'train'}", override]
    return ["plan", "--config", "configs/demo.py", "--topology", "v5p-8", "--config.plan.xla_estimate=False", override]


@pytest.mark.parametrize("cmd", ["train", "demo", "plan"])
@pytest.mark.parametrize(
    "override,field", MISTAKES, ids=[m[0].split("=")[0][9:] + "=" + m[0].split("=")[1] for m in MISTAKES]
)
def test_config_mistake_is_exit_2_naming_the_field(cmd, override, field, tmp_path, capsys, monkeypatch):
    if cmd == "plan" and field == "mesh" and "3" in override:
        pytest.importorskip("libtpu")  # the plan's devices are the topology's
    if cmd != "plan" and "3" in override and len(jax.devices()) != 8:
        pytest.skip("needs the 8 test devices")
    # nothing may train or compile: any stage run is a failure of the check
    for name, s in list(STAGES.items()):
        monkeypatch.setitem(
            STAGES,
            name,
            dataclasses.replace(s, run=lambda *a, **k: pytest.fail("a stage ran despite a config mistake")),
        )
    rc = main(_argv(cmd, override, tmp_path))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and field in err and "Traceback" not in err, err
    if "stpes" in override:
        assert "did you mean 'sft.steps'" in err


def test_schema_round_trip_and_every_field_settable():
    exp = Experiment()
    assert from_config_dict(to_config_dict(exp)) == exp
    # one field of each leaf config, from a config file's override
    e = load_experiment(
        "configs/demo.py",
        [
            "--config.grpo.optim.warmup_steps=5",
            "--config.grpo.optim.schedule=cosine",
            "--config.grpo.optim.b2=0.95",
            "--config.grpo.optim.weight_decay=0.1",
            "--config.grpo.optim.grad_clip=0.5",
            "--config.grpo.loss.kl_coef=0.01",
            "--config.grpo.loss.dual_clip=3.0",
            "--config.grpo.ssb.alpha=0.5",
            "--config.grpo.top_p=0.9",
            "--config.grpo.repetition_penalty=1.05",
            "--config.mpo.loss.beta=0.2",
            "--config.mpo.pairs.threshold=2.5",
            "--config.grpo.reward.w_format=0.5",
            "--config.eval.top_p=0.95",
        ],
    )
    g = e.grpo
    assert (g.optim.warmup_steps, g.optim.schedule, g.optim.b2, g.optim.weight_decay, g.optim.grad_clip) == (
        5,
        "cosine",
        0.95,
        0.1,
        0.5,
    )
    assert (g.loss.kl_coef, g.loss.dual_clip, g.ssb.alpha, g.top_p, g.repetition_penalty) == (0.01, 3.0, 0.5, 0.9, 1.05)
    assert (e.mpo.loss.beta, e.mpo.pairs.threshold, g.reward.w_format, e.eval.top_p) == (0.2, 2.5, 0.5, 0.95)
    assert g.needs_ref and g.sampling((7,)).top_p == 0.9
    # a cosine schedule's length defaults to the stage's steps
    prog = program_mod.build_program("grpo", e, model_config_from(e), {"mlp1": {"w": np.zeros(2)}})
    assert prog.optim.total_steps == g.steps and prog.needs_ref
    # the 38B configs are valid experiments
    assert load_experiment("configs/grpo_38b.py").grpo.optim.trainable == "adapter"
    assert load_experiment("configs/mpo_38b.py").mpo.pairs.threshold == 15.0


def test_errors_name_nested_fields():
    c = default_config()
    c.unlock()
    c.grpo.ssb.capacity = 0
    with pytest.raises(ExperimentError, match=r"grpo\.ssb: capacity"):
        from_config_dict(c)
    with pytest.raises(ValueError, match=r"demo: override grpo\.optim\.b1="):
        experiment_from(demo_config(), "demo", ["--config.grpo.optim.b1=(1,2)"])
    with pytest.raises(ExperimentError, match=r"grpo\.optim\.b1: expected a number, got str"):
        from_config_dict({"grpo": {"optim": {"b1": "0.9"}}})
    with pytest.raises(ExperimentError, match=r"data\.synthetic_categories\[1\]: expected a string"):
        from_config_dict({"data": {"synthetic_categories": ["color", 3]}})


@pytest.mark.slow
def test_plan_builds_the_step_training_runs(tmp_path, monkeypatch):
    """A GRPO config with a KL term: the step `r1v2 train` calls and the one `r1v2 plan` lowers
    take the same abstract arguments (state with its SSB buffer, batch, reference parameters)."""
    if len(jax.devices()) != 8:
        pytest.skip("needs the 8 test devices")
    calls = []
    real = program_mod.make_train_step

    def recording(*a, **k):
        step = real(*a, **k)

        def wrapped(state, batch, ref):
            calls.append(
                jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), (state, batch, ref))
            )
            return step(state, batch, ref)

        return wrapped

    monkeypatch.setattr(program_mod, "make_train_step", recording)
    exp = experiment_from(
        demo_config(),
        "test",
        [
            f"--config.run_dir={tmp_path}",
            "--config.stages=('grpo',)",
            "--config.grpo.reward_model.kind=none",
            "--config.grpo.steps=1",
            "--config.grpo.group_size=2",
            "--config.grpo.max_new_tokens=4",
            "--config.grpo.loss.kl_coef=0.05",
            "--config.grpo.ssb.capacity=8",
            "--config.data.synthetic_n=20",
            "--config.eval.prompts=2",
            "--config.eval.max_new_tokens=2",
            "--config.progress=False",
            "--config.export=False",
            "--config.checkpoint.async_save=False",
            "--config.mesh=(1,8,1)",
        ],
    )
    run_experiment(exp)
    assert len(calls) == 1
    trained = calls[0]
    assert trained[2] is not None  # the KL term's reference parameters reach the step
    from r1v2_jax.plan.programs import train_program_args

    monkeypatch.setattr(program_mod, "make_train_step", real)
    mc = model_config_from(exp)
    rows = exp.data.batch_size * exp.grpo.group_size
    _, planned = train_program_args(exp, "grpo", mc, make_mesh(1, 8, 1), rows, tiles=1)
    t_leaves, t_def = jax.tree.flatten(trained)
    p_leaves, p_def = jax.tree.flatten(planned)
    assert t_def == p_def
    for a, b in zip(t_leaves, p_leaves):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
        assert a.sharding.is_equivalent_to(b.sharding, len(a.shape)), (a.shape, a.sharding, b.sharding)
    assert dataclasses.is_dataclass(exp)


@pytest.mark.parametrize(
    "argv,field",
    [(["--k", "0"], "k"), (["--config.eval.top_p=2"], "top_p"), (["--config.data.max_tiless=3"], "data.max_tiless")],
)
def test_eval_settings_are_checked_by_the_schema(argv, field, tmp_path, capsys):
    rc = main(["eval", "--model", str(tmp_path / "none"), "--data", str(tmp_path / "none.jsonl"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and field in err and "Traceback" not in err, err
