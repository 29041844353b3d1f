"""The MPO stage: preference pairs mined from policy samples, then the MPO update
(``w_p·DPO + w_q·BCO + w_g·NLL`` against the frozen reference)."""

from __future__ import annotations

import dataclasses
import random

from r1v2_jax.data.formats import SkipCounter
from r1v2_jax.data.pipeline import sequence_iterator
from r1v2_jax.rewards.format import FormatConfig
from r1v2_jax.rewards.hybrid import HybridConfig
from r1v2_jax.rewards.rm_config import RewardModelConfig
from r1v2_jax.rl.mpo import MPOConfig
from r1v2_jax.sampling.sampler import SamplingParams
from r1v2_jax.train.loop import run_loop
from r1v2_jax.train.preference_pairs import make_preference_records
from r1v2_jax.train.program import BATCH_LAYOUTS, PACKED_PAIR_KEYS, build_program
from r1v2_jax.train.reward_scoring import make_rollout_rm
from r1v2_jax.train.run import device_batch, init_run_state, row_tiles
from r1v2_jax.train.stages.base import StageContext, positive
from r1v2_jax.train.stages.sft import cold_start_response
from r1v2_jax.train.state import OptimConfig

PAIR_SOURCES = ("policy", "answers")


@dataclasses.dataclass(frozen=True)
class PairMining:
    """How preference pairs are mined: ``candidates`` policy samples for each of the first
    ``prompts`` training prompts at ``temperature`` / ``top_p``, chosen = reward >= ``threshold``.
    ``reward_model`` scores the candidates too (:mod:`r1v2_jax.train.reward_scoring`; its score
    enters the combined reward with ``reward.w_rm``); ``threshold_on``: ``total`` (the combined
    reward) or ``rm`` (the reward model's score alone, as the paper's thresholds 7 / 10 / 15).

    ``source``: ``policy`` (the above) or ``answers``: no sampling; each of the first
    ``prompts`` records gives one pair, its known answer in the cold-start format (chosen)
    against a wrong answer in the same format (rejected), drawn (seeded) from the other choices
    of a multiple-choice record or else from the answers of the other records of its category
    (:func:`answer_pairs`). Curated pairs, as a released reward model is trained on rather than
    on the policy's own samples; a record with no wrong answer to draw is skipped and counted."""

    source: str = "policy"

    candidates: int = 4
    threshold: float = 1.5
    prompts: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    reward: HybridConfig = dataclasses.field(default_factory=HybridConfig)
    format: FormatConfig = dataclasses.field(default_factory=FormatConfig)
    reward_model: RewardModelConfig = dataclasses.field(default_factory=RewardModelConfig)
    threshold_on: str = "total"
    # RM thresholds the pair-mining line's ``calibration`` reports (empty: score percentiles)
    sweep: tuple[float, ...] = ()

    def __post_init__(self):
        positive(self, "prompts")
        if self.source not in PAIR_SOURCES:
            raise ValueError(f"source: expected one of {', '.join(PAIR_SOURCES)}, got {self.source!r}")
        if self.threshold_on not in ("total", "rm"):
            raise ValueError(f"threshold_on: expected 'total' or 'rm', got {self.threshold_on!r}")
        if self.threshold_on == "rm" and self.reward_model.kind == "none":
            raise ValueError("threshold_on: 'rm' needs a reward_model (kind is 'none')")
        if self.candidates < 2:
            raise ValueError(f"candidates: must be >= 2 (a pair needs two), got {self.candidates}")
        if not 0 < self.top_p <= 1 or not self.temperature >= 0:
            raise ValueError(
                f"temperature / top_p: need temperature >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}"
            )


def wrong_answers(record: dict, by_category: dict) -> list[str]:
    """The wrong answers a pair can give for ``record``: its other choices (letters when its
    answer is a letter, else the choices' texts), or else the other answers seen in its category."""
    ans = str(record["answer"]).strip()
    choices = record.get("choices") or []
    if choices:
        letters = [chr(65 + i) for i in range(len(choices))]
        pool = letters if ans.upper() in letters else [str(c).strip() for c in choices]
    else:
        pool = by_category.get(record.get("category", ""), ())
    return sorted({a for a in pool if a.lower() != ans.lower()})


def answer_pairs(records: list[dict], seed: int) -> tuple[list[dict], dict]:
    """One curated pair per record (``PairMining.source = "answers"``): the known answer's
    cold-start response against a seeded draw of :func:`wrong_answers`. Deterministic, so every
    host builds the same list from the same records."""
    by_category: dict[str, set] = {}
    for r in records:
        by_category.setdefault(r.get("category", ""), set()).add(str(r["answer"]).strip())
    rng = random.Random(seed)
    out, skipped = [], 0
    for r in records:
        wrong = wrong_answers(r, by_category)
        if not wrong:
            skipped += 1
            continue
        out.append(
            {
                "images": r["images"],
                "prompt": r["question"],
                "chosen": cold_start_response(r),
                "rejected": cold_start_response(dict(r, answer=rng.choice(wrong))),
                "_root": r["_root"],
                "_where": r["_where"],
            }
        )
    return out, {"prompts": len(records), "pairs": len(out), "source": "answers", "no_wrong_answer": skipped}


def mine_pairs(ctx: StageContext, params, stage: str, pairs: PairMining) -> list[dict]:
    """This experiment's pairs for ``stage`` (logged once as ``<stage>_pairs``)."""
    run = ctx.run
    if pairs.source == "answers":
        pref, info = answer_pairs(ctx.train[: pairs.prompts], run.seed)
    else:
        pref, info = _policy_pairs(ctx, params, stage, pairs)
    if run.logged(f"{stage}_pairs") is None:
        run.metrics.write({"stage": f"{stage}_pairs", "step": 0, **info})
    return pref


def _policy_pairs(ctx: StageContext, params, stage: str, pairs: PairMining) -> tuple[list[dict], dict]:
    run = ctx.run
    eos = run.eos_ids()
    sp = SamplingParams(
        max_new_tokens=ctx.exp.data.max_completion_len,
        temperature=pairs.temperature,
        top_p=pairs.top_p,
        eos_ids=eos,
        pad_id=eos[0] if eos else 0,
    )
    return make_preference_records(
        run,
        params,
        ctx.train[: pairs.prompts],
        candidates=pairs.candidates,
        threshold=pairs.threshold,
        sp=sp,
        batch_size=ctx.exp.data.batch_size,
        hybrid=pairs.reward,
        fmt=pairs.format,
        seed=run.seed,
        rm=make_rollout_rm(pairs.reward_model, run, ctx.train, ctx.reward_params, where=f"{stage}.pairs.reward_model"),
        threshold_on=pairs.threshold_on,
        sweep=pairs.sweep,
    )


@dataclasses.dataclass(frozen=True)
class MPOSection:
    steps: int = 20
    micro_batches: int = 1
    # lr 1e-4 (the demo's recipe; 5e-4 until 2026-12-03): at 5e-4 seed 0's MPO collapsed held-out
    # pass@1 from 0.508 to 0.042 (gradient norms 5-26 before clipping); at 1e-4 MPO's mean over
    # seeds 0-4 is 0.483 against SFT's 0.442 (README, the demo's seeds)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-4, trainable="all"))
    loss: MPOConfig = dataclasses.field(default_factory=MPOConfig)
    pairs: PairMining = dataclasses.field(default_factory=PairMining)

    step_kind = "mpo"
    needs_ref = True

    def __post_init__(self):
        positive(self, "steps", "micro_batches")

    def step_kwargs(self) -> dict:
        return {"mpo_cfg": self.loss}


def train_on_pairs(ctx: StageContext, stage: str, params, pref: list[dict], sec, ref=None):
    """The loop the MPO and RM stages share: ``params`` (the policy's, or the reward model's)
    trained by ``stage``'s program on the preference records ``pref``; the trained parameters."""
    run = ctx.run
    prog = build_program(stage, ctx.exp, run.model_config, params, run.mesh)
    state = init_run_state(run, params, prog.optimizer)
    it = sequence_iterator(
        pref,
        run.builder,
        dataclasses.replace(run.pipeline, seed=run.seed),
        kind="preference",
        tile_size=run.model_config.tile_size,
        skips=SkipCounter(),
    )
    keys = [k for k, _ in BATCH_LAYOUTS[prog.kind]]

    def one(state, batch):
        names = PACKED_PAIR_KEYS if "packed_ids" in batch else keys  # data.pack_length > 0: packed rows
        state, m = prog.step(state, device_batch(run, {k: batch[k] for k in names}, row_tiles(run, batch)), ref)
        return state, {k: float(v) for k, v in m.items()}

    return run_loop(run, stage, state, sec.steps, it, one, max_consecutive_skips=sec.optim.max_consecutive_skips).params


def run_mpo(ctx: StageContext, params, sec: MPOSection):
    ref = ctx.reference(params)
    pref = mine_pairs(ctx, params, "mpo", sec.pairs)
    if not pref:
        return params
    return train_on_pairs(ctx, "mpo", params, pref, sec, ref)
