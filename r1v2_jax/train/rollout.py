"""Rollouts on the sampler mesh and their rule/format rewards, and the learner's view of a rollout."""

from __future__ import annotations

import logging

import jax
import numpy as np

from r1v2_jax.parallel import multihost as dist
from r1v2_jax.rewards.format import FormatConfig, format_reward
from r1v2_jax.rewards.hybrid import HybridConfig, combine, rm_metrics, rm_term
from r1v2_jax.sampling.sampler import Sampler, SamplingParams
from r1v2_jax.train.run import Run, row_tiles

log = logging.getLogger("r1v2_jax.train")


def rollout(
    run: Run,
    sampler: Sampler,
    params,
    batch: dict,
    sp: SamplingParams,
    group: int,
    key: jax.Array,
    tiles: int | None = None,
):
    """Sample ``group`` completions per prompt (this host's prompts); returns the sampler
    output (this host's rows, numpy) and this host's per-row tiles."""
    out, pix = start_rollout(run, sampler, params, batch, sp, group, key, tiles)
    return out.host_local(), pix


def start_rollout(
    run: Run,
    sampler: Sampler,
    params,
    batch: dict,
    sp: SamplingParams,
    group: int,
    key: jax.Array,
    tiles: int | None = None,
):
    """:func:`rollout`, dispatched and not waited for: (the sampler's output as device arrays
    on the sampler mesh, this host's per-row tiles); ``.host_local()`` of the output waits."""
    sampler.set_params(run.for_sampler(params))
    pix = row_tiles(run, batch, tiles)
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    out = sampler(
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=pix,
        sp=sp,
        num_samples=group,
        seed=seed,
    )
    return out, pix


def score_completions(run: Run, out, answers, choices, group: int, hybrid: HybridConfig, fmt: FormatConfig, rm=None):
    """Rule and format rewards of this host's completions (``out``: host-local numpy rows),
    combined over all hosts' rows -> (total, rule: global f32[N]; texts: this host's; metrics
    over the global batch; this host's slice of the global rows). Answers are checked in the
    run's :class:`~r1v2_jax.rewards.verifier.VerifierPool`, so none costs more than
    ``run.verifier.timeout`` seconds (such an answer scores 0; ``verifier_failures`` counts
    this batch's over all hosts).

    ``rm``: ``rm(texts) -> RMScores`` (global scores, :mod:`r1v2_jax.train.reward_scoring`)
    adds ``w_rm`` times the reward model's score. A group with a row the reward model could
    not score has total **NaN** on all its rows (never a silent zero: the caller drops it);
    metrics add ``rm_failed`` (rows), ``rm_dropped_groups`` and ``_rm`` (the global scores,
    NaN where missing; not logged)."""
    tokens = np.asarray(out.tokens)
    lengths = np.asarray(out.lengths)
    m = out.logprobs.shape[1]
    texts = [
        run.tokenizer.decode(
            tokens[i, tokens.shape[1] - m : tokens.shape[1] - m + lengths[i]].tolist(), skip_special_tokens=False
        )
        for i in range(len(tokens))
    ]
    gold = [a for a in answers for _ in range(group)]
    ch = [c for c in choices for _ in range(group)]
    pool = run.verifier_pool()
    failed_before = pool.errors.total()
    rule = np.asarray(pool.score(list(zip(texts, gold, ch))), np.float32)
    fr = np.asarray([format_reward(t, fmt) for t in texts], np.float32)
    both, mine = dist.gather_rows(np.stack([rule, fr], axis=1))
    rm_scores = bad = None
    if rm is not None:
        res = rm(texts)
        rm_scores = np.asarray(res.scores, np.float32)
        bad = np.repeat(~np.isfinite(rm_scores).reshape(-1, group).all(axis=1), group)
    total, metrics = combine(both[:, 0], both[:, 1], None if rm is None else np.where(bad, 0.0, rm_scores), hybrid)
    if rm is not None:
        total = np.where(bad, np.nan, total).astype(np.float32)
        kept = ~bad
        if kept.any():
            metrics.update(rm_metrics(rm_scores[kept], rm_term(rm_scores[kept], hybrid.rm_transform), hybrid))
        else:
            metrics.update(reward_rm=float("nan"))
        metrics.update(
            reward_total=float(total[kept].mean()) if kept.any() else float("nan"),
            rm_failed=int(res.failed),
            rm_dropped_groups=int(bad.sum() // group),
            _rm=rm_scores,
        )
    metrics["verifier_failures"] = dist.total(pool.errors.total() - failed_before)  # this batch's, all hosts
    return total, both[:, 0], texts, metrics, mine


def grpo_batch(out, pix, group: int) -> dict:
    """The learner's view of a rollout: full sequences, masks, sampling log-probs at each token."""
    tokens = np.asarray(out.tokens)
    n, total = tokens.shape
    m = out.logprobs.shape[1]
    p = total - m
    lengths = np.asarray(out.lengths)
    plen = np.asarray(out.prompt_lengths)
    pos = np.arange(total)[None]
    attn = (pos >= p - plen[:, None]) & (pos < p + lengths[:, None])
    comp = (pos >= p) & (pos < p + lengths[:, None])
    old = np.zeros((n, total), np.float32)
    old[:, p:] = np.asarray(out.ref_logprobs)
    b = {"tokens": tokens.astype(np.int32), "attention_mask": attn, "completion_mask": comp, "old_logp": old}
    if pix is not None:
        b["pixel_values"] = np.repeat(pix, group, axis=0)
    return b
