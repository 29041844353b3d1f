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
from r1v2_jax.rewards.calibration import HallucinationMonitor, MonitorConfig, contradicts_facts
from r1v2_jax.rewards.format import FormatConfig
from r1v2_jax.rewards.hybrid import HybridConfig
from r1v2_jax.rewards.rm_config import RewardModelConfig
from r1v2_jax.rewards.verifier import extract_answer
from r1v2_jax.rl.advantages import group_advantages, nonzero_variance_groups
from r1v2_jax.rl.losses import PolicyLossConfig
from r1v2_jax.rl.ssb import SSBConfig, ssb_add, ssb_mix, ssb_shardings
from r1v2_jax.sampling.sampler import SamplingParams
from r1v2_jax.train.loop import run_loop
from r1v2_jax.train.program import build_program
from r1v2_jax.train.reward_scoring import make_rollout_rm
from r1v2_jax.train.rollout import grpo_batch, rollout, score_completions
from r1v2_jax.train.run import Run, device_batch, init_run_state, init_ssb
from r1v2_jax.train.stages.base import StageContext, positive
from r1v2_jax.train.stages.overlap import run_ahead
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
    # the reward model scoring the rollouts (``kind`` none: rule + format only; see
    # r1v2_jax.train.reward_scoring; planned by `r1v2 plan` beside the policy)
    reward_model: RewardModelConfig = dataclasses.field(default_factory=RewardModelConfig)
    # watches each rollout for reward hacking: ``contradiction_rate`` (answers stating counts the
    # image's facts contradict) and, with a reward model, ``rm_high_on_wrong`` (verifier-wrong
    # samples the RM scores above ``rm_high``), both logged every step; past a bound for
    # ``patience`` steps in a row the run stops with the reason (action "stop"; bounds of 1 = off)
    monitor: MonitorConfig = dataclasses.field(
        default_factory=lambda: MonitorConfig(max_contradiction_rate=1.0, max_rm_high_on_wrong=1.0, action="stop")
    )
    # 1: one-step off-policy, overlapped: the rollout for step t + 1 runs on the sampler's own
    # devices (``sampler_devices``) with the parameters of step t while the learner updates
    # step t (see :mod:`r1v2_jax.train.stages.overlap`); 0: rollout, then update
    rollout_ahead: int = 0

    step_kind = "grpo"

    def __post_init__(self):
        positive(self, "steps", "micro_batches", "max_new_tokens")
        if self.group_size < 2:
            raise ValueError(
                f"group_size: must be >= 2 (advantages compare samples of a prompt), got {self.group_size}"
            )
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"advantage: expected one of {', '.join(ADVANTAGES)}, got {self.advantage!r}")
        if self.rollout_ahead not in (0, 1):
            raise ValueError(f"rollout_ahead: expected 0 or 1, got {self.rollout_ahead!r}")
        if self.monitor.action != "stop":
            raise ValueError(
                f"monitor.action: GRPO's monitor can only stop the run, got {self.monitor.action!r} "
                "(raising a threshold is MPO pair mining's)"
            )
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
    example = prog.example_spec(tiles, run.model_config.tile_size)
    ssb = init_ssb(run, cfg.ssb.capacity, example) if cfg.use_ssb else None
    state = init_run_state(run, params, prog.optimizer, ssb=ssb)
    rm = make_rollout_rm(cfg.reward_model, run, records, ctx.reward_params)
    g = GRPOStep(run, cfg, sampler, prog.step, ref_params, tiles, rm)

    def one(state, batch):
        t0 = time.perf_counter()
        out, pix = rollout(run, sampler, state.params, batch, g.sp, cfg.group_size, step_key(state, 1), tiles)
        t_roll = time.perf_counter() - t0
        dev, rmetrics = g.prepare(out, pix, batch, int(state.step))
        t1 = time.perf_counter()
        state, metrics, m = g.update(state, dev)
        jax.block_until_ready(state.params)
        t_upd = time.perf_counter() - t1
        metrics.update({k: float(v) for k, v in m.items()})
        metrics.update(
            rmetrics,
            rollout_seconds=t_roll,
            update_seconds=t_upd,
            tokens_per_s=float(rmetrics["_tokens"] / max(t_roll, 1e-9)),
            skipped_samples=dist.total(it.skips.total),
        )
        return state, metrics

    if cfg.rollout_ahead:
        return run_ahead(g, state, it).params
    return run_loop(
        run, "grpo", state, cfg.steps, it, one, max_consecutive_skips=cfg.optim.max_consecutive_skips
    ).params


class GRPOStep:
    """The two halves of a GRPO step, shared by the sequential loop and the overlapped one
    (:func:`r1v2_jax.train.stages.overlap.run_ahead`): :meth:`prepare` (host: rewards,
    advantages, the learner's batch) and :meth:`update` (device: SSB mix/add, policy update)."""

    def __init__(self, run: Run, cfg: GRPOSection, sampler, step_fn, ref_params, tiles, rm=None):
        self.run, self.cfg, self.sampler, self.step_fn, self.ref_params, self.tiles = (
            run,
            cfg,
            sampler,
            step_fn,
            ref_params,
            tiles,
        )
        self.rm = rm  # the reward model's scorer (r1v2_jax.train.reward_scoring), or None
        self.monitor = HallucinationMonitor(cfg.monitor, threshold=0.0)
        self.sp = cfg.sampling(run.eos_ids())
        self.add, self.mix = jax.jit(self._add), jax.jit(self._mix)

    def _held(self, ssb):
        """The buffer keeps its capacity axis split over the batch axes (``init_ssb``) from step to step."""
        if self.run.mesh is None:
            return ssb
        return jax.lax.with_sharding_constraint(ssb, ssb_shardings(ssb, self.run.mesh))

    def _add(self, s, p, a, r):
        s, m = ssb_add(s, p, a, r, self.cfg.ssb)
        return self._held(s), m

    def _mix(self, s, p, a, k):
        mixed, adv, s, m = ssb_mix(s, p, a, k, self.cfg.ssb)
        return mixed, adv, self._held(s), m

    def prepare(self, out, pix, batch, gen_step: int) -> tuple[dict, dict]:
        """Score a rollout (``out``: this host's rows, numpy) of ``batch``, generated with the
        parameters of step ``gen_step`` -> (the learner's device batch with ``_advantages``,
        ``_total`` and ``gen_step`` i32[N], metrics: reward metrics, ``response_length`` and
        ``_tokens``, the completion tokens)."""
        run, cfg = self.run, self.cfg
        rm = None if self.rm is None else (lambda texts: self.rm.score(out, pix, batch, texts, cfg.group_size))
        total, rule, texts, rmetrics, mine = score_completions(
            run, out, batch["answer"], batch["choices"], cfg.group_size, cfg.reward, cfg.format, rm
        )
        self._watch(texts, batch, rule[mine], rmetrics.pop("_rm", None), mine, gen_step, rmetrics)
        # a group the reward model could not score (total NaN) leaves the update: no advantage,
        # no loss tokens, never stored in the SSB
        dropped = np.isnan(total)
        total = np.where(dropped, 0.0, total).astype(np.float32)
        # groups never straddle hosts (a prompt's G samples are consecutive rows of its host)
        adv_all = np.asarray(
            group_advantages(
                jnp.asarray(total), cfg.group_size, mode=cfg.advantage, std_ddof=cfg.std_ddof, eps=cfg.adv_eps
            )
        )
        adv_all = np.where(dropped, 0.0, adv_all).astype(np.float32)
        b = grpo_batch(out, pix, cfg.group_size)
        if pix is None:
            b.pop("pixel_values", None)
        if cfg.dynamic_sampling:  # DAPO: zero-variance groups leave the batch (and its loss normaliser)
            keep = np.asarray(nonzero_variance_groups(jnp.asarray(total), cfg.group_size))[mine]
            b["completion_mask"] = b["completion_mask"] & keep[:, None]
        if dropped.any():
            b["completion_mask"] = b["completion_mask"] & ~dropped[mine][:, None]
        b["_advantages"], b["_total"] = adv_all[mine], np.asarray(total, np.float32)[mine]
        b["gen_step"] = np.full((len(b["tokens"]),), gen_step, np.int32)
        lengths, _ = dist.gather_rows(np.asarray(out.lengths))
        metrics = dict(rmetrics, response_length=float(lengths.mean()), _tokens=float(lengths.sum()))
        return device_batch(run, b), metrics

    def _watch(self, texts, batch, rule, rm_scores, mine, step: int, metrics: dict) -> None:
        """The hallucination monitor on this rollout (all hosts' rates): logs
        ``contradiction_rate`` (prompts with image facts) and ``rm_high_on_wrong`` (with a
        reward model); raises when the monitor says stop."""
        g = self.cfg.group_size
        facts = batch.get("facts") or [[] for _ in range(len(texts) // g)]
        answers = [extract_answer(t) for t in texts]
        contra = [float(contradicts_facts(a, facts[i // g])) for i, a in enumerate(answers) if facts[i // g]]
        n_facts, n_contra = dist.total(len(contra)), dist.total(sum(contra))
        metrics["contradiction_rate"] = n_contra / n_facts if n_facts else 0.0
        rm_wrong = 0.0
        if rm_scores is not None:
            local = rm_scores[mine]
            wrong = (rule <= 0) & np.isfinite(local)
            n_wrong = dist.total(int(wrong.sum()))
            high = dist.total(int((local[wrong] > self.cfg.monitor.rm_high).sum()))
            rm_wrong = high / n_wrong if n_wrong else 0.0
            metrics["rm_high_on_wrong"] = rm_wrong
        d = self.monitor.decide(step, metrics["contradiction_rate"], rm_wrong)  # the same on every host
        if d.action == "stop":
            raise RuntimeError(
                f"grpo.monitor: stopping at step {step}: {d.reason} for {self.cfg.monitor.patience} step(s) in "
                "a row (reward hacking? lower the RM weight, raise the bounds or resume from an earlier checkpoint)"
            )

    def update(self, state, dev: dict):
        """SSB mix/add and the policy update of ``state`` on the batch ``dev`` (from :meth:`prepare`;
        the SSB's replays carry their own ``gen_step``). Dispatched, not waited for: returns
        (state, host metrics, the step's metrics as device arrays). ``staleness_mean`` /
        ``staleness_max``: steps between generating a trained sample and this update."""
        dev = dict(dev)
        adv, total_d = dev.pop("_advantages"), dev.pop("_total")
        metrics = {}
        if state.ssb is not None:
            dev_mixed, adv_mixed, ssb_state, mm = self.mix(state.ssb, dev, adv, step_key(state, 2))
            ssb_state, ma = self.add(ssb_state, dev, adv, total_d)
            metrics.update({k: float(v) for k, v in {**mm, **ma}.items()})
            dev, adv = dev_mixed, adv_mixed
            state = state.replace(ssb=ssb_state)
        else:
            metrics["effective_share_before"] = float((jnp.abs(adv) > 0).mean())
        stale = state.step - dev.pop("gen_step")
        metrics.update(staleness_mean=float(stale.mean()), staleness_max=float(stale.max()))
        dev["advantages"] = adv
        state, m = self.step_fn(state, dev, self.ref_params)
        return state, metrics, m


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
