"""Experiments: the demo and 38B configs, and :func:`run_experiment`, which runs an
:class:`~r1v2_jax.train.schema.Experiment`'s stages in order (each from the stage registry)
with a held-out evaluation after each, then exports the final model.

``configs/*.py`` files return ConfigDicts made by :func:`demo_config` (the schema's defaults)
or :func:`released_38b_config`; :func:`r1v2_jax.train.config_files.load_experiment` checks and
converts them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time

import jax
import ml_collections
import numpy as np

from r1v2_jax.convert.pretrained import load_model, load_pretrained, save_released
from r1v2_jax.data.formats import load_records
from r1v2_jax.data.pipeline import PipelineConfig
from r1v2_jax.data.prompt import PromptBuilder
from r1v2_jax.data.synthetic import make_synthetic
from r1v2_jax.data.tokenizer import chat_template, load_tokenizer, tiny_tokenizer
from r1v2_jax.model.config import ModelConfig, TextConfig, VisionConfig, model_config
from r1v2_jax.model.vlm import R1V2Model, init_params, param_shardings
from r1v2_jax.parallel import multihost as dist
from r1v2_jax.parallel.sharding import make_mesh
from r1v2_jax.train.checkpoints import pull_dataset, sync_logs
from r1v2_jax.train.evaluate import evaluate
from r1v2_jax.train.metrics_log import MetricsLog, plot_curves
from r1v2_jax.train.run import Run
from r1v2_jax.train.schema import ExperimentError, default_config, from_config_dict, mesh_for
from r1v2_jax.train.stages import STAGES, StageContext

log = logging.getLogger("r1v2_jax")


def demo_config() -> ml_collections.ConfigDict:
    """The schema's defaults: the demo's task and recipe with rule + format rewards only
    (SFT -> MPO -> GRPO with SSB; configs/demo.py, ``r1v2 train --config configs/demo.py``), the
    base the 38B configs and the tests build on. ``r1v2 demo`` runs :func:`demo_hybrid_config`."""
    return default_config()


def demo_hybrid_config() -> ml_collections.ConfigDict:
    """The CPU demo (``r1v2 demo``, configs/demo_hybrid.py): the whole hybrid reward, SFT -> RM ->
    MPO -> GRPO. The ``rm`` stage trains a reward model (the SFT policy's backbone + a value head)
    with the Bradley–Terry loss on curated pairs, each training record's known answer against a
    wrong one (``rm.pairs.source = "answers"``, all 480 records, 40 steps); GRPO's reward is rule
    + 0.5 x σ(RM score) + format (``rm_transform = "sigmoid"``: bounded, so pleasing the reward
    model never pays more than the verifier), group advantages with ``adv_eps = 0.1``. Before 2026-12-03 the reward model was trained on
    ~40 pairs mined from the SFT policy and entered raw: GRPO learned to please it (seed 0's
    held-out pass@1 0.258 against 0.775 without it; README)."""
    c = demo_config()
    c.stages = ("sft", "rm", "mpo", "grpo")
    c.rm.steps = 40
    c.rm.pairs.source = "answers"
    c.rm.pairs.prompts = 512  # every training record of the demo's 480
    c.grpo.reward_model.kind = "ours"
    c.grpo.reward.w_rm = 0.5
    c.grpo.reward.rm_transform = "sigmoid"
    # A group the verifier scores alike (all right or all wrong) differs only by the RM term;
    # with eps 1e-6 its std normalisation blows differences of 1e-3 up to unit advantages, and
    # on a seed whose RM learned nothing (seed 3: scores constant to 1e-3) GRPO walked on that
    # noise to held-out 0.000. eps 0.1 keeps such advantages as small as the differences (0.283).
    c.grpo.adv_eps = 0.1
    # The colour task's prompts are 59 tokens (chat template, 4 image tokens, the question); the
    # schema's 192 leaves room for other tasks and tilings. Padding every batch to 192 + 32 made
    # the demo's GRPO step 2.3x slower (1.30 -> 0.58 s; attention and activations over padding).
    c.data.max_prompt_len = 64
    return c


def released_38b_config(stage: str) -> ml_collections.ConfigDict:
    """What every experiment on the released 38B model shares (configs/grpo_38b.py,
    configs/mpo_38b.py): the model and data locations to fill in, R1V2's 4k-prompt / 8k-completion
    lengths with dynamic tiling (6 tiles + thumbnail), full remat, and the learner's and sampler's
    meshes. Runs ``stage`` only."""
    c = demo_config()
    c.run_dir = f"runs/{stage}_38b"
    c.stages = (stage,)
    c.grpo.reward_model.kind = "none"  # the demo's is the rm stage's; set skywork_vl + path for the paper's
    c.model.preset = "r1v2_38b"
    c.model.init = "/path/to/r1v2-38b-ckpt"  # hf_to_jax output or the released HF directory
    c.model.remat_policy = "full"  # 4k + 8k-token sequences: recompute each layer in the backward pass
    # ... and keep each layer's input split over tensor by sequence (v5p-128 GRPO: train
    # temporaries 10.1 -> 4.1 GiB per chip, r1v2 plan)
    c.model.sequence_parallel = True
    c.data.path = "/path/to/data"  # a folder with train.jsonl / test.jsonl (``rl`` records)
    c.data.max_prompt_len = 4096
    c.data.max_completion_len = 8192
    c.data.dynamic_tiling = True
    c.data.max_tiles = 6
    c.checkpoint.every = 50
    c.mesh = (1, -1, 4)  # learner: FSDP across chips, 4-way tensor parallelism within a host
    # sampler: data-parallel replicas of 4-way tensor-parallel weights: decoding reads each weight
    # once per token instead of all-gathering the FSDP shards every token (r1v2 plan on v5p-128:
    # rollout 185 s instead of 239 s by XLA's estimate, 41 GiB/chip instead of 26)
    c.sampler_mesh = (-1, 1, 4)
    c.plan.tiles_per_sample = 7  # 6 dynamic tiles + thumbnail
    c.export = False
    return c


def with_model_overrides(mc: ModelConfig, m) -> ModelConfig:
    """``mc`` with what the experiment's model section sets over any model (``remat_policy``,
    ``attention_impl``; empty: the model's own; ``sequence_parallel`` when True)."""
    if m.remat_policy:
        mc = mc.replace(remat_policy=m.remat_policy)
    if m.sequence_parallel:
        mc = mc.replace(sequence_parallel=True)
    return mc.replace(attention_impl=m.attention_impl) if m.attention_impl else mc


def model_config_from(exp) -> ModelConfig:
    """The model an experiment names: a preset, or the random tiny model of its widths, with
    the model section's overrides (:func:`with_model_overrides`)."""
    m = exp.model
    if m.preset != "tiny" or m.init != "random":
        return with_model_overrides(model_config(m.preset), m)
    mc = ModelConfig(
        vision=VisionConfig(
            hidden_size=m.vision_hidden,
            num_layers=m.vision_layers,
            num_heads=m.vision_heads,
            intermediate_size=m.vision_mlp,
            image_size=m.image_size,
            patch_size=14,
        ),
        text=TextConfig(
            vocab_size=m.vocab_size,
            hidden_size=m.text_hidden,
            num_layers=m.text_layers,
            num_heads=m.text_heads,
            num_kv_heads=m.text_kv_heads,
            intermediate_size=m.text_mlp,
            max_position_embeddings=4096,
        ),
        image_token_id=m.image_token_id,
    )
    return with_model_overrides(mc, m)


def experiment_meshes(exp, devices=None):
    """(learner mesh, sampler mesh) of ``exp`` over ``devices`` (default: all), None for
    one device / the learner's; several processes without a mesh use (1, -1, 1). With
    ``sampler_devices`` = k > 0 the meshes are disjoint: the learner's over the first n - k
    devices, the sampler's over the last k."""
    if exp.sampler_devices:
        return split_meshes(exp, devices)
    if "grpo" in exp.stages and exp.grpo.rollout_ahead:
        raise ExperimentError(
            "sampler_devices: grpo.rollout_ahead=1 samples on devices of its own while the learner "
            "updates; set sampler_devices (e.g. half of the devices) or grpo.rollout_ahead=0 "
            "(r1v2 plan proposes a split)"
        )
    n = len(devices) if devices is not None else jax.device_count()
    shape = mesh_for(exp, "mesh", n)
    if shape is None and jax.process_count() > 1 and devices is None:
        shape = (1, n, 1)
    s_shape = mesh_for(exp, "sampler_mesh", n)
    mesh = make_mesh(*shape, devices=devices) if shape else None
    return mesh, (make_mesh(*s_shape, devices=devices) if s_shape else None)


def split_devices(exp, devices=None) -> tuple[list, list]:
    """(learner devices, sampler devices) for ``sampler_devices`` = k: the first n - k and the
    last k; ExperimentError naming the field when that leaves either side empty."""
    if jax.process_count() > 1 and devices is None:
        raise ExperimentError(
            "sampler_devices: disjoint learner and sampler meshes run in one process only for now "
            f"({jax.process_count()} processes); unset it, and grpo.rollout_ahead"
        )
    devices = list(devices) if devices is not None else jax.devices()
    n, k = len(devices), exp.sampler_devices
    if not 0 < k < n:
        raise ExperimentError(
            f"sampler_devices: {k} of the {n} devices leaves {'none' if k >= n else 'all'} for the learner "
            f"(need 0 < sampler_devices < {n})"
        )
    return devices[: n - k], devices[n - k :]


def split_meshes(exp, devices=None):
    """The learner's and the sampler's meshes on disjoint devices (:func:`split_devices`):
    ``mesh`` over the learner's (default (1, -1, 1)), ``sampler_mesh`` over the sampler's
    (default (-1, 1, 1): data-parallel replicas)."""
    learner, sampler = split_devices(exp, devices)
    shape = mesh_for(exp, "mesh", len(learner)) or (1, len(learner), 1)
    s_shape = mesh_for(exp, "sampler_mesh", len(sampler)) or (len(sampler), 1, 1)
    return make_mesh(*shape, devices=learner), make_mesh(*s_shape, devices=sampler)


def _ensure_data(exp) -> str:
    if "://" in exp.data.path:  # a bucket: each host reads a local copy
        return pull_dataset(exp.data.path, os.path.join(exp.run_dir, "data_cache"))
    path = exp.data.path or os.path.join(exp.run_dir, "data")

    def make():
        if not os.path.exists(os.path.join(path, "train.jsonl")):
            make_synthetic(
                path,
                exp.data.synthetic_n,
                seed=exp.seed,
                image_size=exp.model.image_size,
                categories=tuple(exp.data.synthetic_categories),
                max_difficulty=exp.data.synthetic_max_difficulty,
                overwrite=True,
            )

    if dist.is_main():
        make()
    dist.barrier("synthetic-data")
    make()  # hosts that do not share process 0's disk make the same (seeded) data themselves
    return path


def load_experiment_model(exp):
    """(model config with the section's overrides, parameters, tokenizer, chat template) of
    ``exp.model``."""
    if exp.model.init == "random":
        mc = model_config_from(exp)
        return (
            mc,
            init_params(mc, jax.random.key(exp.seed)),
            tiny_tokenizer(mc.image_token_id, mc.text.vocab_size),
            None,
        )
    if not os.path.exists(exp.model.init):
        raise ExperimentError(
            f"model.init: {exp.model.init} does not exist (a released HF directory or an r1v2-jax checkpoint)"
        )
    loaded = load_model(exp.model.init)
    mc = with_model_overrides(loaded.config, exp.model)
    if exp.model.preset != "tiny":
        want = model_config_from(exp)
        if (want.vision, want.text) != (mc.vision, mc.text):
            raise ExperimentError(
                f"model.init: {exp.model.init} holds a different model than preset "
                f"{exp.model.preset!r} (ViT {mc.vision.hidden_size}x{mc.vision.num_layers}, "
                f"LLM {mc.text.hidden_size}x{mc.text.num_layers})"
            )
    return mc, loaded.params, load_tokenizer(exp.model.init), chat_template(exp.model.init)


def make_run(exp, mc, tok, template, mesh, sampler_mesh, metrics: MetricsLog | None = None) -> Run:
    """The :class:`Run` every stage of ``exp`` shares (``metrics``: default ``run_dir``'s log)."""
    d = exp.data
    builder = PromptBuilder(
        tok,
        mc.tokens_per_tile(),
        template=template,
        max_prompt_len=d.max_prompt_len,
        max_completion_len=d.max_completion_len,
    )
    pipe = PipelineConfig(
        batch_size=d.batch_size,
        seed=exp.seed,
        worker_count=d.workers,
        dynamic_tiling=d.dynamic_tiling,
        max_tiles=d.max_tiles,
        length_buckets=d.length_buckets or (d.max_prompt_len, d.max_prompt_len + d.max_completion_len),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        max_image_megapixels=d.max_image_megapixels,
        max_consecutive_skips=d.max_consecutive_skips,
        pack_length=d.pack_length,
        pack_rows_multiple=d.pack_rows_multiple,
        alpha=d.alpha,
    )
    metrics = metrics or MetricsLog(exp.run_dir, is_main=jax.process_index() == 0)
    ck = exp.checkpoint
    return Run(
        mc,
        tok,
        builder,
        exp.run_dir,
        metrics,
        seed=exp.seed,
        checkpoint_every=ck.every,
        checkpoint_dir=ck.dir,
        keep=ck.keep,
        async_checkpoints=ck.async_save,
        progress=exp.progress,
        progress_seconds=exp.progress_seconds,
        pipeline=pipe,
        mesh=mesh,
        sampler_mesh=sampler_mesh,
        verifier=exp.verifier,
        engine=exp.rollout_engine.engine(),
    )


def run_experiment(exp) -> dict:
    """Run ``exp`` (an Experiment, or a ConfigDict checked into one) and return its summary."""
    if not dataclasses.is_dataclass(exp):
        exp = from_config_dict(exp)
    t_start = time.perf_counter()
    mesh, sampler_mesh = experiment_meshes(exp)
    os.makedirs(exp.run_dir, exist_ok=True)
    mc, params, tok, template = load_experiment_model(exp)
    if mesh is not None:
        params = jax.device_put(params, param_shardings(mc, mesh))
    data_dir = _ensure_data(exp)
    train = load_records(os.path.join(data_dir, "train.jsonl"), "rl")
    test = load_records(os.path.join(data_dir, "test.jsonl"), "rl")
    if exp.eval.prompts:
        test = test[: exp.eval.prompts]
    sync_logs(exp.run_dir, exp.checkpoint.dir, pull=True)  # resuming on a new machine: continue the kept logs
    run = make_run(exp, mc, tok, template, mesh, sampler_mesh)
    try:
        ctx = StageContext(run, exp, train, test)
        evals = {"init": _evaluate(ctx, "init", params)}
        last = "init"
        for name in exp.stages:
            params = STAGES[name].run(ctx, params, getattr(exp, name))
            evals[name] = _evaluate(ctx, name, params) if STAGES[name].changes_policy else evals[last]
            last = name
        summary = {
            "evals": evals,
            "rewards": reward_means(run.metrics.rows()),
            "seconds": time.perf_counter() - t_start,
        }
        if exp.export:
            host_params = dist.gather_to_host(params, mesh)  # the released format is written from one host
            if dist.is_main():
                summary["export"] = _export(run, host_params)
        if dist.is_main():
            summary["plot"] = plot_curves(run.metrics.rows(), os.path.join(exp.run_dir, "curves.png"))
            with open(os.path.join(exp.run_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2, default=str)
    finally:
        run.close()  # the verifier pool's workers end with the run
    run.metrics.close()
    sync_logs(exp.run_dir, exp.checkpoint.dir)  # summary.json beside the checkpoints marks the run finished
    dist.barrier("run-finished")
    return summary


def _evaluate(ctx: StageContext, name: str, params) -> dict:
    """Held-out pass@1 after stage ``name`` (a resumed run reuses the evaluations it made)."""
    done = ctx.run.logged(f"eval_{name}")
    if done is not None:
        return {"pass@1": done["pass@1"], "n": done["n"], "per_category": done["per_category"]}
    e = ctx.exp.eval
    r = evaluate(
        ctx.run,
        params,
        ctx.test,
        k=e.k,
        temperature=e.temperature,
        top_p=e.top_p,
        max_new_tokens=e.max_new_tokens,
        seed=ctx.exp.seed,
    )
    ctx.run.metrics.write(
        {"stage": f"eval_{name}", "step": 0, "pass@1": r["pass@1"], "n": r["n"], "per_category": r["per_category"]}
    )
    return r


def _export(run: Run, params) -> dict:
    """Save the final model in the released HF format and check that it reloads exactly."""
    out = os.path.join(run.run_dir, "export", "released")
    model = R1V2Model(run.model_config, params)
    save_released(model, out, overwrite=True)
    run.tokenizer.save(os.path.join(out, "tokenizer.json"))
    back = load_pretrained(out)
    ids = np.asarray([[1, 2, 3, 4]])
    same = bool(np.array_equal(np.asarray(model(ids)), np.asarray(back(ids))))
    same &= all(
        jax.tree.leaves(
            jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), params, back.params)
        )
    )
    return {"path": out, "reload_identical": same}


# reward_rm: the raw score; reward_rm_term: what entered the total with a transform (before w_rm)
REWARD_COMPONENTS = ("reward_rule", "reward_format", "reward_rm", "reward_rm_term", "reward_total")


def reward_means(rows) -> dict:
    """{stage: {component: mean over the stage's logged steps}} for the stages that log the
    hybrid reward's components (GRPO's steps; a pair-mining line's RM mean)."""
    out: dict = {}
    for r in rows:
        comps = {k: r[k] for k in REWARD_COMPONENTS if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])}
        if comps:
            acc = out.setdefault(r["stage"], {})
            for k, v in comps.items():
                acc.setdefault(k, []).append(float(v))
    return {st: {k: sum(v) / len(v) for k, v in comps.items()} for st, comps in out.items()}


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells as aligned lines, a rule under the first (the header)."""
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(x.ljust(w[i]) for i, x in enumerate(r)) for r in rows]
    return lines[:1] + ["-+-".join("-" * x for x in w)] + lines[1:]


def format_summary(summary: dict) -> str:
    rows = [("stage", "held-out pass@1", "n")]
    for name, r in summary["evals"].items():
        rows.append((name, f"{r['pass@1']:.3f}", str(r["n"])))
    lines = _table(rows)
    if summary.get("rewards"):
        head = ("stage (mean reward)", "rule", "format", "rm score", "rm term", "total")
        lines += [""] + _table(
            [head]
            + [
                (st, *(f"{c[k]:.3f}" if k in c else "-" for k in REWARD_COMPONENTS))
                for st, c in summary["rewards"].items()
            ]
        )
    if "export" in summary:
        e = summary["export"]
        lines.append(f"export: {e['path']} (reload identical: {e['reload_identical']})")
    lines.append(f"total time: {summary['seconds']:.0f}s")
    return "\n".join(lines)
