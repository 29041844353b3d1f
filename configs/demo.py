"""The demo's task and recipe with rule + format rewards only (the schema's defaults): SFT cold
start -> MPO -> GRPO with SSB, evaluated after each stage, then exported
(`r1v2 train --config configs/demo.py`). `r1v2 demo` runs configs/demo_hybrid.py, the same
with a reward model in the GRPO reward."""

from r1v2_jax.train.experiment import demo_config


def get_config():
    return demo_config()
