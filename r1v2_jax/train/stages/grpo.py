"""The GRPO stage: rollout, hybrid reward, group advantages, SSB, policy update."""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from r1v2_jax.data.formats import SkipCounter
from r1v2_jax.data.pipeline import rl_prompt_iterator
from r1v2_jax.parallel import multihost as dist
from r1v2_jax.rewards.format import FormatConfig
from r1v2_jax.rewards.hybrid import HybridConfig
from r1v2_jax.rl.advantages import group_advantages, nonzero_variance_groups
from r1v2_jax.rl.losses import PolicyLossConfig
from r1v2_jax.rl.ssb import SSBConfig, ssb_add, ssb_init, ssb_mix
from r1v2_jax.sampling.sampler import SamplingParams
from r1v2_jax.train.loop import run_loop
from r1v2_jax.train.program import build_program
from r1v2_jax.train.rollout import grpo_batch, rollout, score_completions
from r1v2_jax.train.run import Run, device_batch, init_run_state
from r1v2_jax.train.stages.base import StageContext, positive
from r1v2_jax.train.state import OptimConfig, step_key

log = logging.getLogger("r1v2_jax.train")


ADVANTAGES = ("grpo", "drgrpo", "rloo")


@dataclasses.dataclass(frozen=True)
class GRPOSection:
    """GRPO: ``group_size`` samples per prompt (``data.batch_size`` prompts a step), the hybrid
    reward, group advantages, the Selective Sample Buffer (``use_ssb``) or DAPO's dynamic
    sampling, and the clipped policy loss (``loss``; its ``kl_coef`` > 0 adds the KL penalty to
    the frozen reference)."""

    steps: int = 200
    group_size: int = 8
    micro_batches: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    advantage: str = "grpo"
    std_ddof: int = 1
    adv_eps: float = 1e-6
    use_ssb: bool = True
    dynamic_sampling: bool = False
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-4, trainable="all"))
    loss: PolicyLossConfig = dataclasses.field(default_factory=lambda: PolicyLossConfig(clip_high=0.28))
    ssb: SSBConfig = dataclasses.field(default_factory=lambda: SSBConfig(reuse_limit=2, max_age=8))
    reward: HybridConfig = dataclasses.field(default_factory=HybridConfig)
    format: FormatConfig = dataclasses.field(default_factory=FormatConfig)

    step_kind = "grpo"

    def __post_init__(self):
        positive(self, "steps", "micro_batches", "max_new_tokens")
        if self.group_size < 2:
            raise ValueError(
                f"group_size: must be >= 2 (advantages compare samples of a prompt), got {self.group_size}"
            )
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"advantage: expected one of {', '.join(ADVANTAGES)}, got {self.advantage!r}")
        if self.use_ssb and self.dynamic_sampling:
            raise ValueError("use_ssb / dynamic_sampling: choose one (both fill the batch with informative groups)")
        SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
        )  # its checks

    @property
    def needs_ref(self) -> bool:
        return self.loss.kl_coef > 0

    def policy_loss(self) -> PolicyLossConfig:
        """The loss config, with ``seq-mean-token-sum-norm``'s divisor defaulting to max_new_tokens."""
        return dataclasses.replace(self.loss, norm_tokens=self.loss.norm_tokens or self.max_new_tokens)

    def step_kwargs(self) -> dict:
        return {"policy_cfg": self.policy_loss()}

    def sampling(self, eos_ids: tuple[int, ...]) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            eos_ids=eos_ids,
            pad_id=eos_ids[0] if eos_ids else 0,
        )


def run_grpo(ctx: StageContext, params, cfg: GRPOSection):
    run, records = ctx.run, ctx.train
    ref_params = ctx.reference(params) if cfg.needs_ref else None
    # Static shapes across steps (the SSB stores whole examples): one prompt length, one tile count.
    prompt_len, tiles = grpo_shapes(run, records)
    prog = build_program("grpo", ctx.exp, run.model_config, params, run.mesh, prompt_len=prompt_len)
    pipe = dataclasses.replace(run.pipeline, seed=run.seed, length_buckets=(prompt_len,))
    it = rl_prompt_iterator(records, run.builder, pipe, tile_size=run.model_config.tile_size, skips=SkipCounter())
    run.verifier_pool()  # its workers warm up while the sampler compiles
    sampler = run.sampler(params)
    sp = cfg.sampling(run.eos_ids())
    add = jax.jit(lambda s, p, a, r: ssb_add(s, p, a, r, cfg.ssb))
    mix = jax.jit(lambda s, p, a, k: ssb_mix(s, p, a, k, cfg.ssb))
    example = prog.example_spec(tiles, run.model_config.tile_size)
    ssb = ssb_init(cfg.ssb.capacity, example) if cfg.use_ssb else None
    state = init_run_state(run, params, prog.optimizer, ssb=ssb)
    hybrid, fmt, step_fn = cfg.reward, cfg.format, prog.step

    def one(state, batch):
        t0 = time.perf_counter()
        out, pix = rollout(run, sampler, state.params, batch, sp, cfg.group_size, step_key(state, 1), tiles)
        t_roll = time.perf_counter() - t0
        total, rule, texts, rmetrics, mine = score_completions(
            run, out, batch["answer"], batch["choices"], cfg.group_size, hybrid, fmt
        )
        # groups never straddle hosts (a prompt's G samples are consecutive rows of its host)
        adv_all = np.asarray(
            group_advantages(
                jnp.asarray(total), cfg.group_size, mode=cfg.advantage, std_ddof=cfg.std_ddof, eps=cfg.adv_eps
            )
        )
        b = grpo_batch(out, pix, cfg.group_size)
        if pix is None:
            b.pop("pixel_values", None)
        if cfg.dynamic_sampling:  # DAPO: zero-variance groups leave the batch (and its loss normaliser)
            keep = np.asarray(nonzero_variance_groups(jnp.asarray(total), cfg.group_size))[mine]
            b["completion_mask"] = b["completion_mask"] & keep[:, None]
        b["_advantages"], b["_total"] = adv_all[mine], np.asarray(total, np.float32)[mine]
        dev = device_batch(run, b)
        adv, total_d = dev.pop("_advantages"), dev.pop("_total")
        metrics = {}
        if state.ssb is not None:
            dev_mixed, adv_mixed, ssb_state, mm = mix(state.ssb, dev, adv, step_key(state, 2))
            ssb_state, ma = add(ssb_state, dev, adv, total_d)
            metrics.update({k: float(v) for k, v in {**mm, **ma}.items()})
            dev, adv = dev_mixed, adv_mixed
            state = state.replace(ssb=ssb_state)
        else:
            metrics["effective_share_before"] = float((jnp.abs(adv) > 0).mean())
        dev["advantages"] = adv
        t1 = time.perf_counter()
        state, m = step_fn(state, dev, ref_params)
        jax.block_until_ready(state.params)
        t_upd = time.perf_counter() - t1
        lengths, _ = dist.gather_rows(np.asarray(out.lengths))
        metrics.update({k: float(v) for k, v in m.items()})
        metrics.update(
            rmetrics,
            response_length=float(lengths.mean()),
            rollout_seconds=t_roll,
            update_seconds=t_upd,
            tokens_per_s=float(lengths.sum() / max(t_roll, 1e-9)),
            skipped_samples=dist.total(it.skips.total),
        )
        return state, metrics

    return run_loop(
        run, "grpo", state, cfg.steps, it, one, max_consecutive_skips=cfg.optim.max_consecutive_skips
    ).params


def grpo_shapes(run: Run, records) -> tuple[int, int]:
    """(prompt length, tiles per prompt) of every GRPO batch: the smallest length bucket that
    holds max_prompt_len (a multiple of the sampler's bucket), and the most tiles a prompt can
    have with this run's tiling settings."""
    pc = run.pipeline
    fits = [b for b in pc.length_buckets if b >= run.builder.max_prompt_len]
    prompt_len = fits[0] if fits else -(-run.builder.max_prompt_len // 32) * 32
    per_image = (pc.max_tiles + (1 if pc.use_thumbnail and pc.max_tiles > 1 else 0)) if pc.dynamic_tiling else 1
    images = max((len(r["images"]) for r in records), default=0)
    return prompt_len, per_image * images
