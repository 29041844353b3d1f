"""Preference pairs mined from policy samples (R1V2's MPO data recipe, also the ``rm`` stage's
data): sample candidates per prompt, score them, pair chosen (reward >= threshold) with
rejected (< threshold). The threshold reads the combined reward (rule + RM + format,
``threshold_on="total"``) or, as the paper splits pairs, the reward model's score alone
(``threshold_on="rm"``)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from r1v2_jax.data.pipeline import rl_prompt_iterator
from r1v2_jax.parallel import multihost as dist
from r1v2_jax.rewards.calibration import Candidate, build_pairs, threshold_report
from r1v2_jax.rewards.format import FormatConfig
from r1v2_jax.rewards.hybrid import HybridConfig
from r1v2_jax.sampling.sampler import SamplingParams
from r1v2_jax.train.rollout import rollout, score_completions
from r1v2_jax.train.run import Run, synced


def make_preference_records(
    run: Run,
    params,
    records,
    *,
    candidates: int,
    threshold: float,
    sp: SamplingParams,
    batch_size: int,
    hybrid: HybridConfig = HybridConfig(),
    fmt: FormatConfig = FormatConfig(),
    seed: int = 0,
    rm=None,
    threshold_on: str = "total",
    sweep: tuple[float, ...] = (),
) -> tuple[list[dict], dict]:
    """Sample candidates with the policy, score them, and pair chosen (reward >= threshold)
    with rejected (< threshold): the R1V2 MPO data recipe. ``rm``: the reward model's scorer
    (:func:`r1v2_jax.train.reward_scoring.make_rollout_rm`); a prompt with a candidate it could
    not score gives no pair (``rm_dropped_prompts``).

    With a reward model, ``info`` also calibrates the split on RM scores, over all hosts'
    candidates: ``calibration`` (:func:`~r1v2_jax.rewards.calibration.threshold_report` at each
    of ``sweep``, default the 10/25/50/75/90th percentiles of the scores: pairs, agreement of
    the preference with the verifier) and ``rm_high_on_wrong`` (the share of verifier-wrong
    candidates the RM scores at or above ``threshold``: wrong answers the split would call
    chosen)."""
    if threshold_on not in ("total", "rm"):
        raise ValueError(f"threshold_on: expected 'total' or 'rm', got {threshold_on!r}")
    if threshold_on == "rm" and rm is None:
        raise ValueError("threshold_on: 'rm' splits pairs on reward-model scores, but no reward model is configured")
    run.verifier_pool()  # its workers warm up while the sampler compiles
    sampler = run.sampler(params)
    cfg = dataclasses.replace(run.pipeline, batch_size=batch_size, num_epochs=1, seed=seed, drop_remainder=False)
    it = rl_prompt_iterator(records, run.builder, cfg, tile_size=run.model_config.tile_size)
    by_where = {r["_where"]: r for r in records}
    mine, n_prompts, refused, rm_dropped, rm_sum, rm_n = [], 0, 0, 0, 0.0, 0
    scored = []  # (rm score, verifier reward) per candidate of each scored prompt, for calibration
    key = jax.random.key(seed)
    for batch in synced(it):
        key, k = jax.random.split(key)
        out, pix = rollout(run, sampler, sampler.model.params, batch, sp, candidates, k)  # already resharded
        scorer = None if rm is None else (lambda texts: rm.score(out, pix, batch, texts, candidates))  # noqa: B023
        total, rule, texts, sm, rows = score_completions(
            run, out, batch["answer"], batch["choices"], candidates, hybrid, fmt, scorer
        )
        total, rule = total[rows], rule[rows]
        rms = None if rm is None else sm["_rm"][rows]  # this host's RM scores (NaN: unscored)
        split_on = total if threshold_on == "total" else rms
        if rm is not None:
            ok = np.isfinite(total)
            rm_sum, rm_n = rm_sum + float(rms[ok].sum()), rm_n + int(ok.sum())
        # a sample holding a special token mid-text (e.g. <IMG_CONTEXT>) cannot be trained on as text
        usable = [run.builder.completion_special_token(t) is None for t in texts]
        refused += usable.count(False)
        groups = [
            [
                Candidate(
                    texts[i * candidates + j], float(split_on[i * candidates + j]), float(rule[i * candidates + j])
                )
                for j in range(candidates)
                if usable[i * candidates + j]
            ]
            for i in range(len(batch["answer"]))
        ]
        real = [i for i, pad in enumerate(batch["pad"]) if not pad]
        unscored = [i for i in real if not np.isfinite(total[i * candidates : (i + 1) * candidates]).all()]
        rm_dropped += len(unscored)
        real = [i for i in real if i not in unscored]
        if rm is not None:
            scored += [
                [(float(rms[i * candidates + j]), float(rule[i * candidates + j])) for j in range(candidates)]
                for i in real
            ]
        for p, c, r in build_pairs([groups[i] for i in real], threshold, "absolute"):
            p = real[p]
            src = by_where[batch["where"][p]]
            mine.append(
                {
                    "images": src["images"],
                    "prompt": src["question"],
                    "chosen": groups[p][c].text,
                    "rejected": groups[p][r].text,
                    "_root": src["_root"],
                    "_where": src["_where"],
                }
            )
        n_prompts += len(real)
    # every host trains on all pairs (the MPO iterator shards them again), in process order
    out_records = [r for host in dist.allgather_json(mine) for r in host]
    info = {"prompts": int(dist.total(n_prompts)), "pairs": len(out_records)}
    if refused := int(dist.total(refused)):
        info["refused_samples"] = refused
    if rm is not None:
        n_rm = dist.total(rm_n)
        info.update(
            rm_dropped_prompts=int(dist.total(rm_dropped)),
            reward_rm=float(dist.total(rm_sum) / n_rm) if n_rm else float("nan"),
            threshold_on=threshold_on,
            **_calibration([g for host in dist.allgather_json(scored) for g in host], threshold, sweep),
        )
    return out_records, info


def _calibration(groups: list, threshold: float, sweep: tuple[float, ...]) -> dict:
    """The pair split calibrated on RM scores (see :func:`make_preference_records`)."""
    if not groups:
        return {}
    scores = np.asarray([s for g in groups for s, _ in g], np.float64)
    ts = tuple(sweep) or tuple(float(v) for v in np.percentile(scores, [10, 25, 50, 75, 90]))
    cands = [[Candidate("", s, c) for s, c in g] for g in groups]
    wrong = np.asarray([c <= 0 for g in groups for _, c in g])
    high = float((scores[wrong] >= threshold).mean()) if wrong.any() else 0.0
    return {"calibration": threshold_report(cands, ts), "rm_high_on_wrong": high}
