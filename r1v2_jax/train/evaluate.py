"""Held-out evaluation: pass@1 over k samples per question, overall and per category."""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np

from r1v2_jax.data.formats import SkipCounter
from r1v2_jax.data.pipeline import rl_prompt_iterator
from r1v2_jax.parallel import multihost as dist
from r1v2_jax.rewards.format import FormatConfig
from r1v2_jax.rewards.hybrid import HybridConfig
from r1v2_jax.sampling.sampler import SamplingParams
from r1v2_jax.train.rollout import rollout, score_completions
from r1v2_jax.train.run import Run, synced

log = logging.getLogger("r1v2_jax.train")


def evaluate(
    run: Run,
    params,
    records,
    *,
    k: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    seed: int = 0,
    skips: SkipCounter | None = None,
) -> dict:
    """pass@1 averaged over ``k`` samples per question, overall and per category, and
    ``skipped``: the items left out, by reason, summed over hosts (with those already in
    ``skips``, e.g. from reading the file). ``n`` counts the questions scored."""
    skips = skips if skips is not None else SkipCounter()
    run.verifier_pool()  # its workers warm up while the sampler compiles
    sampler = run.sampler(params)
    sp = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_ids=run.eos_ids(),
        pad_id=run.eos_ids()[0] if run.eos_ids() else 0,
    )
    cfg = dataclasses.replace(run.pipeline, batch_size=batch_size, num_epochs=1, seed=seed, drop_remainder=False)
    it = rl_prompt_iterator(records, run.builder, cfg, tile_size=run.model_config.tile_size, skips=skips)
    mine = []  # (category, mean rule reward over the k samples) of this host's real prompts
    key = jax.random.key(seed)
    for batch in synced(it):
        key, kk = jax.random.split(key)
        out, _ = rollout(run, sampler, sampler.model.params, batch, sp, k, kk)  # already resharded
        _, rule, _, _, rows = score_completions(
            run, out, batch["answer"], batch["choices"], k, HybridConfig(), FormatConfig()
        )
        rule = rule[rows]
        mine += [
            (cat or "all", float(rule[i * k : (i + 1) * k].mean()))
            for i, (cat, pad) in enumerate(zip(batch["category"], batch["pad"]))
            if not pad
        ]
    per_cat: dict[str, list[float]] = {}
    for cat, v in (x for host in dist.allgather_json(mine) for x in host):
        per_cat.setdefault(cat, []).append(v)
    allv = [v for vs in per_cat.values() for v in vs]
    skipped: dict[str, int] = {}
    for host in dist.allgather_json(skips.as_dict()):
        for reason, n in host.items():
            skipped[reason] = skipped.get(reason, 0) + n
    return {
        "pass@1": float(np.mean(allv)) if allv else float("nan"),
        "n": len(allv),
        "per_category": {c: (float(np.mean(v)), len(v)) for c, v in sorted(per_cat.items())},
        "skipped": dict(sorted(skipped.items())),
    }
