"""Experiments: the demo config and ``run_experiment``, which runs a config's stages
(SFT cold start, MPO, GRPO) with evaluation after each, then exports the final model.

``configs/*.py`` files return ConfigDicts shaped like :func:`demo_config`.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

log = logging.getLogger("r1v2_jax")


def demo_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_dir = "runs/demo"
    c.seed = 0
    c.stages = ("sft", "mpo", "grpo")
    c.model = ml_collections.ConfigDict(dict(
        preset="tiny", init="random",
        vision_hidden=64, vision_layers=2, vision_heads=4, vision_mlp=128, image_size=56,
        text_hidden=128, text_layers=2, text_heads=4, text_kv_heads=2, text_mlp=256, vocab_size=256,
        image_token_id=255,
        # "" = the model's own (the 38B preset: full; tiny presets and checkpoints read from
        # config.json: none); full | dots | save_qkv_attn | none (r1v2_jax.model.layers.remat_policy)
        remat_policy="",
        # "" = the model's own (auto: splash on TPU); auto | xla | chunked | splash (r1v2_jax.model.attention)
        attention_impl=""))
    c.data = ml_collections.ConfigDict(dict(
        path="", synthetic_n=600, synthetic_categories=("color",), synthetic_max_difficulty=1,
        batch_size=8, max_prompt_len=192, max_completion_len=32, workers=0, dynamic_tiling=False, max_tiles=1))
    c.sft = ml_collections.ConfigDict(dict(steps=200, lr=1e-3, trainable="all", micro_batches=1))
    c.mpo = ml_collections.ConfigDict(dict(steps=20, lr=5e-4, trainable="all", candidates=4, threshold=1.5,
                                           temperature=1.0, beta=0.1, w_pref=0.8, w_quality=0.2, w_gen=1.0,
                                           prompts=64, micro_batches=1))
    c.grpo = ml_collections.ConfigDict(dict(
        steps=200, lr=1e-4, trainable="all", group_size=8, max_new_tokens=32, temperature=1.0, micro_batches=1,
        advantage="grpo", use_ssb=True, dynamic_sampling=False, kl_coef=0.0, clip_low=0.2, clip_high=0.28,
        aggregation="seq-mean-token-mean", ssb_capacity=256, ssb_target_share=0.6, ssb_alpha=1.0,
        ssb_reuse_limit=2, ssb_max_age=8))
    c.eval = ml_collections.ConfigDict(dict(k=1, temperature=0.0, max_new_tokens=32, prompts=0))
    # dir: "" = run_dir/checkpoints; a bucket (gs://...) for pods: the logs are mirrored there
    c.checkpoint = ml_collections.ConfigDict(dict(every=10, keep=2, async_save=True, dir=""))
    # (data, fsdp, tensor) for training on several devices/hosts; () = one device. Several
    # processes without a mesh use (1, -1, 1): FSDP over every device.
    c.mesh = ()
    # (data, fsdp, tensor) for the sampler (rollouts, MPO candidates, evaluation) over the same
    # devices; () = the learner's mesh. Parameters are resharded onto it before each rollout.
    c.sampler_mesh = ()
    # r1v2 plan: the meshes (() = the run's mesh / sampler_mesh above; the learner's default
    # (1, -1, 1)), remat policy ("" = model.remat_policy, else full) and tiles per prompt to
    # compile for, the efficiencies its roofline step time assumes, and whether to also compile
    # the few-layer variants behind XLA's own step-time estimate (see r1v2_jax/plan/planner.py), and
    # the share of peak FLOP/s assumed for the Pallas attention kernels XLA's estimate leaves out
    c.plan = ml_collections.ConfigDict(dict(mesh=(), sampler_mesh=(), remat_policy="",
                                            tiles_per_sample=1, assumed_mfu=0.4, assumed_bandwidth_util=0.7,
                                            xla_estimate=True, kernel_efficiency=0.5))
    c.export = True
    c.progress = True
    return c


def released_38b_config(stage: str) -> ml_collections.ConfigDict:
    """What every experiment on the released 38B model shares (configs/grpo_38b.py,
    configs/mpo_38b.py): the model and data locations to fill in, R1V2's 4k-prompt / 8k-completion
    lengths with dynamic tiling (6 tiles + thumbnail), full remat, and the learner's and sampler's
    meshes. Runs ``stage`` only."""
    c = demo_config()
    c.run_dir = f"runs/{stage}_38b"
    c.stages = (stage,)
    c.model.preset = "r1v2_38b"
    c.model.init = "/path/to/r1v2-38b-ckpt"  # hf_to_jax output or the released HF directory
    c.model.remat_policy = "full"  # 4k + 8k-token sequences: recompute each layer in the backward pass
    c.data.path = "/path/to/data"  # a folder with train.jsonl / test.jsonl (``rl`` records)
    c.data.synthetic_n = 0
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


def model_config_from(c: ml_collections.ConfigDict):
    from r1v2_jax.model.config import ModelConfig, TextConfig, VisionConfig, model_config

    m = c.model
    if m.preset != "tiny" or m.init != "random":
        mc = model_config(m.preset)
        return mc.replace(attention_impl=m.attention_impl) if m.attention_impl else mc
    mc = ModelConfig(
        vision=VisionConfig(hidden_size=m.vision_hidden, num_layers=m.vision_layers, num_heads=m.vision_heads,
                            intermediate_size=m.vision_mlp, image_size=m.image_size, patch_size=14),
        text=TextConfig(vocab_size=m.vocab_size, hidden_size=m.text_hidden, num_layers=m.text_layers,
                        num_heads=m.text_heads, num_kv_heads=m.text_kv_heads, intermediate_size=m.text_mlp,
                        max_position_embeddings=4096),
        image_token_id=m.image_token_id)
    return mc.replace(attention_impl=m.attention_impl) if m.attention_impl else mc


def cold_start_response(record: dict) -> str:
    """A short reasoning-format answer for SFT cold start, built from the known answer."""
    hint = {"count": "count", "arith": "compute", "compare": "sizes", "color": "colour"}.get(record.get("category", ""), "think")
    return f"{hint}</think>\\boxed{{{record['answer']}}}"


def _ensure_data(c) -> str:
    from r1v2_jax.data.synthetic import make_synthetic
    from r1v2_jax.parallel import multihost as dist

    path = c.data.path or os.path.join(c.run_dir, "data")

    def make():
        if not os.path.exists(os.path.join(path, "train.jsonl")):
            make_synthetic(path, c.data.synthetic_n, seed=c.seed, image_size=c.model.image_size,
                           categories=tuple(c.data.synthetic_categories),
                           max_difficulty=c.data.synthetic_max_difficulty, overwrite=True)

    if dist.is_main():
        make()
    dist.barrier("synthetic-data")
    make()  # hosts that do not share process 0's disk make the same (seeded) data themselves
    return path


def _mesh(c, key: str = "mesh"):
    from r1v2_jax.parallel.sharding import make_mesh

    shape = tuple(c[key])
    if key == "mesh" and not shape and jax.process_count() > 1:
        shape = (1, -1, 1)
    if not shape:
        return None
    if len(shape) != 3:
        raise ValueError(f"{key}: expected (data, fsdp, tensor), got {shape}")
    return make_mesh(*shape)


def run_experiment(c: ml_collections.ConfigDict) -> dict:
    from r1v2_jax.data.formats import load_records
    from r1v2_jax.data.pipeline import PipelineConfig
    from r1v2_jax.data.prompt import PromptBuilder
    from r1v2_jax.data.tokenizer import tiny_tokenizer
    from r1v2_jax.model.vlm import init_params
    from r1v2_jax.parallel import multihost as dist
    from r1v2_jax.rewards.format import FormatConfig
    from r1v2_jax.rl.losses import PolicyLossConfig
    from r1v2_jax.rl.mpo import MPOConfig
    from r1v2_jax.rl.ssb import SSBConfig
    from r1v2_jax.sampling.sampler import SamplingParams
    from r1v2_jax.train.checkpoints import sync_logs
    from r1v2_jax.train.evaluate import evaluate
    from r1v2_jax.train.run import Run
    from r1v2_jax.train.stages.grpo import GRPOConfig, run_grpo
    from r1v2_jax.train.stages.mpo import make_preference_records, run_mpo
    from r1v2_jax.train.stages.sft import run_sft
    from r1v2_jax.train.metrics_log import MetricsLog, plot_curves
    from r1v2_jax.train.state import OptimConfig

    t_start = time.perf_counter()
    os.makedirs(c.run_dir, exist_ok=True)
    mesh = _mesh(c)
    sampler_mesh = _mesh(c, "sampler_mesh")
    if sampler_mesh is not None and mesh is None:
        raise ValueError("sampler_mesh: set mesh too (the learner's mesh over the same devices)")
    template = None
    if c.model.init == "random":
        mc = model_config_from(c)
        tok = tiny_tokenizer(mc.image_token_id, mc.text.vocab_size)
        params = init_params(mc, jax.random.key(c.seed))
    else:  # a released HF directory or our checkpoint
        import r1v2_jax
        from r1v2_jax.data.tokenizer import chat_template, load_tokenizer

        if not os.path.exists(c.model.init):
            raise FileNotFoundError(f"model.init: {c.model.init} does not exist (a released HF directory or an "
                                    "r1v2-jax checkpoint)")
        loaded = r1v2_jax.load_model(c.model.init)
        mc, params = loaded.config, loaded.params
        if c.model.preset != "tiny":
            want = model_config_from(c)
            if (want.vision, want.text) != (mc.vision, mc.text):
                raise ValueError(f"model.init: {c.model.init} holds a different model than preset "
                                 f"{c.model.preset!r} (ViT {mc.vision.hidden_size}x{mc.vision.num_layers}, "
                                 f"LLM {mc.text.hidden_size}x{mc.text.num_layers})")
        tok = load_tokenizer(c.model.init)
        template = chat_template(c.model.init)
    if c.model.remat_policy:
        mc = mc.replace(remat_policy=c.model.remat_policy)
    if c.model.attention_impl:
        mc = mc.replace(attention_impl=c.model.attention_impl)
    if mesh is not None:
        from r1v2_jax.model.vlm import param_shardings

        params = jax.device_put(params, param_shardings(mc, mesh))
    data_dir = _ensure_data(c)
    train = load_records(os.path.join(data_dir, "train.jsonl"), "rl")
    test = load_records(os.path.join(data_dir, "test.jsonl"), "rl")
    if c.eval.prompts:
        test = test[: c.eval.prompts]
    builder = PromptBuilder(tok, mc.tokens_per_tile(), template=template, max_prompt_len=c.data.max_prompt_len,
                            max_completion_len=c.data.max_completion_len)
    pipe = PipelineConfig(batch_size=c.data.batch_size, seed=c.seed, worker_count=c.data.workers,
                          dynamic_tiling=c.data.dynamic_tiling, max_tiles=c.data.max_tiles,
                          length_buckets=(c.data.max_prompt_len, c.data.max_prompt_len + c.data.max_completion_len),
                          process_index=jax.process_index(), process_count=jax.process_count())
    sync_logs(c.run_dir, c.checkpoint.dir, pull=True)  # resuming on a new machine: continue the kept logs
    metrics = MetricsLog(c.run_dir, is_main=jax.process_index() == 0)
    run = Run(mc, tok, builder, c.run_dir, metrics, seed=c.seed, checkpoint_every=c.checkpoint.every,
                checkpoint_dir=c.checkpoint.dir,
                keep=c.checkpoint.keep, async_checkpoints=c.checkpoint.async_save, progress=c.progress, pipeline=pipe,
                mesh=mesh, sampler_mesh=sampler_mesh)
    evals = {}

    def find(stage):  # process 0's log decides, so every host skips the same work
        return dist.allgather_json(metrics.find(stage))[0]

    def ev(name, p):
        done = find(f"eval_{name}")  # a resumed run reuses evaluations it already made
        if done is not None:
            evals[name] = {"pass@1": done["pass@1"], "n": done["n"], "per_category": done["per_category"]}
            return
        r = evaluate(run, p, test, k=c.eval.k, temperature=c.eval.temperature,
                       max_new_tokens=c.eval.max_new_tokens, seed=c.seed)
        evals[name] = r
        metrics.write({"stage": f"eval_{name}", "step": 0, "pass@1": r["pass@1"], "n": r["n"],
                       "per_category": r["per_category"]})

    ev("init", params)
    ref = None
    for stage in c.stages:
        if stage == "sft":
            sft_records = [dict(r, prompt=r["question"], response=cold_start_response(r)) for r in train]
            params = run_sft(run, params, sft_records, c.sft.steps,
                               OptimConfig(lr=c.sft.lr, trainable=c.sft.trainable), c.sft.micro_batches)
            ref = jax.tree.map(jnp.copy, params)  # its own buffers: train steps donate the state
        elif stage == "mpo":
            ref = ref if ref is not None else jax.tree.map(jnp.copy, params)
            sp = SamplingParams(max_new_tokens=c.data.max_completion_len, temperature=c.mpo.temperature,
                                eos_ids=run.eos_ids(), pad_id=run.eos_ids()[0])
            pref, info = make_preference_records(run, params, train[: c.mpo.prompts], candidates=c.mpo.candidates,
                                                   threshold=c.mpo.threshold, sp=sp, batch_size=c.data.batch_size,
                                                   seed=c.seed)
            if find("mpo_pairs") is None:
                metrics.write({"stage": "mpo_pairs", "step": 0, **info})
            if pref:
                params = run_mpo(run, params, ref, pref, c.mpo.steps,
                                   OptimConfig(lr=c.mpo.lr, trainable=c.mpo.trainable),
                                   MPOConfig(beta=c.mpo.beta, w_pref=c.mpo.w_pref, w_quality=c.mpo.w_quality,
                                             w_gen=c.mpo.w_gen), n_micro=c.mpo.micro_batches)
        elif stage == "grpo":
            g = c.grpo
            params = run_grpo(
                run, params, train, g.steps, OptimConfig(lr=g.lr, trainable=g.trainable),
                GRPOConfig(group_size=g.group_size, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                             micro_batches=g.micro_batches, advantage=g.advantage, use_ssb=g.use_ssb,
                             dynamic_sampling=g.dynamic_sampling, kl_coef=g.kl_coef),
                PolicyLossConfig(clip_low=g.clip_low, clip_high=g.clip_high, aggregation=g.aggregation,
                                 kl_coef=g.kl_coef, norm_tokens=g.max_new_tokens),
                SSBConfig(capacity=g.ssb_capacity, target_share=g.ssb_target_share, alpha=g.ssb_alpha,
                          reuse_limit=g.ssb_reuse_limit, max_age=g.ssb_max_age),
                fmt=FormatConfig(), ref_params=ref if g.kl_coef else None)
        else:
            raise ValueError(f"stages: unknown stage {stage!r} (known: sft, mpo, grpo)")
        ev(stage, params)
    summary = {"evals": evals, "seconds": time.perf_counter() - t_start}
    if c.export:
        host_params = dist.gather_to_host(params, mesh)  # the released format is written from one host
        if dist.is_main():
            summary["export"] = _export(run, host_params)
    if dist.is_main():
        summary["plot"] = plot_curves(metrics.rows(), os.path.join(c.run_dir, "curves.png"))
        with open(os.path.join(c.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
    metrics.close()
    sync_logs(c.run_dir, c.checkpoint.dir)  # summary.json beside the checkpoints marks the run finished (launch/tpu_pod.py)
    dist.barrier("run-finished")
    return summary


def _export(run, params) -> dict:
    """Save the final model in the released HF format and check that it reloads exactly."""
    import r1v2_jax
    from r1v2_jax.model.vlm import R1V2Model

    out = os.path.join(run.run_dir, "export", "released")
    model = R1V2Model(run.model_config, params)
    r1v2_jax.save_released(model, out, overwrite=True)
    run.tokenizer.save(os.path.join(out, "tokenizer.json"))
    back = r1v2_jax.load_pretrained(out)
    ids = np.asarray([[1, 2, 3, 4]])
    same = bool(np.array_equal(np.asarray(model(ids)), np.asarray(back(ids))))
    same &= all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                                             params, back.params)))
    return {"path": out, "reload_identical": same}


def format_summary(summary: dict) -> str:
    rows = [("stage", "held-out pass@1", "n")]
    for name, r in summary["evals"].items():
        rows.append((name, f"{r['pass@1']:.3f}", str(r["n"])))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(x.ljust(w[i]) for i, x in enumerate(r)) for r in rows]
    lines.insert(1, "-+-".join("-" * x for x in w))
    if "export" in summary:
        e = summary["export"]
        lines.append(f"export: {e['path']} (reload identical: {e['reload_identical']})")
    lines.append(f"total time: {summary['seconds']:.0f}s")
    return "\n".join(lines)
