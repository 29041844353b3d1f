"""Preference pairs mined from policy samples (R1V2's MPO data recipe, also the ``rm`` stage's
data): sample candidates per prompt, score them, pair chosen (reward >= threshold) with
rejected (< threshold)."""

from __future__ import annotations

import dataclasses

import jax

from r1v2_jax.data.pipeline import rl_prompt_iterator
from r1v2_jax.parallel import multihost as dist
from r1v2_jax.rewards.calibration import Candidate, build_pairs
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
) -> tuple[list[dict], dict]:
    """Sample candidates with the policy, score them, and pair chosen (reward >= threshold)
    with rejected (< threshold): the R1V2 MPO data recipe."""
    run.verifier_pool()  # its workers warm up while the sampler compiles
    sampler = run.sampler(params)
    cfg = dataclasses.replace(run.pipeline, batch_size=batch_size, num_epochs=1, seed=seed, drop_remainder=False)
    it = rl_prompt_iterator(records, run.builder, cfg, tile_size=run.model_config.tile_size)
    by_where = {r["_where"]: r for r in records}
    mine, n_prompts, refused = [], 0, 0
    key = jax.random.key(seed)
    for batch in synced(it):
        key, k = jax.random.split(key)
        out, _ = rollout(run, sampler, sampler.model.params, batch, sp, candidates, k)  # already resharded
        total, rule, texts, _, rows = score_completions(
            run, out, batch["answer"], batch["choices"], candidates, hybrid, fmt
        )
        total, rule = total[rows], rule[rows]
        # a sample holding a special token mid-text (e.g. <IMG_CONTEXT>) cannot be trained on as text
        usable = [run.builder.completion_special_token(t) is None for t in texts]
        refused += usable.count(False)
        groups = [
            [
                Candidate(texts[i * candidates + j], float(total[i * candidates + j]), float(rule[i * candidates + j]))
                for j in range(candidates)
                if usable[i * candidates + j]
            ]
            for i in range(len(batch["answer"]))
        ]
        real = [i for i, pad in enumerate(batch["pad"]) if not pad]
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
    return out_records, info
