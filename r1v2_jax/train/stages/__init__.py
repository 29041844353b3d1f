"""Training stages: one module per stage, and the registry the experiment schema and
``run_experiment`` read. Adding a stage is one module (its section dataclass and its runner,
see :mod:`r1v2_jax.train.stages.base`) and one entry here."""

from r1v2_jax.train.stages.base import Stage, StageContext
from r1v2_jax.train.stages.grpo import GRPOSection, run_grpo
from r1v2_jax.train.stages.mpo import MPOSection, run_mpo
from r1v2_jax.train.stages.rm import RMSection, run_rm
from r1v2_jax.train.stages.sft import SFTSection, run_sft

STAGES: dict[str, Stage] = {
    "sft": Stage("sft", SFTSection, run_sft),
    "rm": Stage("rm", RMSection, run_rm, changes_policy=False),
    "mpo": Stage("mpo", MPOSection, run_mpo),
    "grpo": Stage("grpo", GRPOSection, run_grpo),
}

__all__ = ["STAGES", "Stage", "StageContext"]
