"""The demo with the whole hybrid reward (SFT -> RM -> MPO -> GRPO, GRPO on rule + 0.5 x RM +
format): `r1v2 train --config configs/demo_hybrid.py`."""

from r1v2_jax.train.experiment import demo_hybrid_config


def get_config():
    return demo_hybrid_config()
