"""The CPU demo (what `r1v2 demo` runs): a tiny model from scratch on the synthetic colour task,
SFT cold start -> MPO -> GRPO with SSB, evaluated after each stage, then exported."""

from r1v2_jax.train.experiment import demo_config


def get_config():
    return demo_config()
