"""The CPU demo, what `r1v2 demo` runs: the whole hybrid reward, SFT -> RM -> MPO -> GRPO, the
reward model trained on the task's curated answer pairs and GRPO on rule + 0.5 x sigmoid(RM) +
format (`r1v2 train --config configs/demo_hybrid.py` runs the same)."""

from r1v2_jax.train.experiment import demo_hybrid_config


def get_config():
    return demo_hybrid_config()
