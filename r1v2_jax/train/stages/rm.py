"""The ``rm`` stage: a reward model (the policy's backbone with a scalar value head,
:class:`~r1v2_jax.rewards.reward_model.RewardModel`) trained with the Bradley–Terry loss on
preference pairs mined from the current policy. The policy's parameters pass through
unchanged; the reward model's are kept in the stage context (``ctx.reward_params``) for the
stages that follow."""

from __future__ import annotations

import dataclasses

import jax

from r1v2_jax.rewards.reward_model import init_reward_params
from r1v2_jax.train.stages.base import StageContext, positive
from r1v2_jax.train.stages.mpo import PairMining, mine_pairs, train_on_pairs
from r1v2_jax.train.state import OptimConfig


@dataclasses.dataclass(frozen=True)
class RMSection:
    steps: int = 20
    micro_batches: int = 1
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=5e-4, trainable="all"))
    pairs: PairMining = dataclasses.field(default_factory=PairMining)

    step_kind = "rm"
    needs_ref = False

    def __post_init__(self):
        positive(self, "steps", "micro_batches")

    def step_kwargs(self) -> dict:
        return {}


def run_rm(ctx: StageContext, params, sec: RMSection):
    run = ctx.run
    pref = mine_pairs(ctx, params, "rm", sec.pairs)
    if not pref:
        raise RuntimeError(
            f"rm: no preference pairs from {sec.pairs.prompts} prompts (every candidate on one side of "
            f"rm.pairs.threshold={sec.pairs.threshold}): nothing to train a reward model on; the policy "
            "may need a cold start (an sft stage before rm) or another threshold"
        )
    rm_params = init_reward_params(
        run.model_config, jax.random.key(run.seed + 1), backbone_params=jax.tree.map(lambda x: x.copy(), params)
    )
    ctx.reward_params = train_on_pairs(ctx, "rm", rm_params, pref, sec)
    return params
