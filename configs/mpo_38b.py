"""MPO on the released 38B model: InternVL's weights (0.8 / 0.2 / 1.0, beta 0.1), pairs from
policy samples split at reward threshold 15 (the paper's best), adapter-only training."""

from r1v2_jax.train.experiment import released_38b_config


def get_config():
    c = released_38b_config("mpo")
    c.data.batch_size = 64  # preference pairs per step
    c.mpo.steps = 750
    c.mpo.optim.lr = 1e-6
    c.mpo.optim.trainable = "adapter"
    c.mpo.pairs.candidates = 8
    c.mpo.pairs.threshold = 15.0
    c.mpo.pairs.prompts = 20000
    c.mpo.micro_batches = 4  # 16 pairs per micro-batch: one per device of a 16-way FSDP axis
    return c
