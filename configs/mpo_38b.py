"""MPO on the released 38B model: InternVL's weights (0.8 / 0.2 / 1.0, beta 0.1), pairs from
policy samples split at reward threshold 15 (the paper's best), adapter-only training."""

from r1v2_jax.experiments import demo_config


def get_config():
    c = demo_config()
    c.run_dir = "runs/mpo_38b"
    c.stages = ("mpo",)
    c.model.preset = "r1v2_38b"
    c.model.init = "/path/to/r1v2-38b-ckpt"
    c.data.path = "/path/to/data"
    c.data.synthetic_n = 0
    c.data.batch_size = 64  # preference pairs per step
    c.data.max_prompt_len = 4096
    c.data.max_completion_len = 8192
    c.data.dynamic_tiling = True
    c.data.max_tiles = 6
    c.mpo.steps = 750
    c.mpo.lr = 1e-6
    c.mpo.trainable = "adapter"
    c.mpo.candidates = 8
    c.mpo.threshold = 15.0
    c.mpo.prompts = 20000
    c.mpo.micro_batches = 4  # 16 pairs per micro-batch: one per device of a 16-way FSDP axis
    c.checkpoint.every = 50
    c.plan.mesh = (1, -1, 4)  # FSDP across chips, 4-way tensor parallelism within a host
    c.plan.tiles_per_sample = 7
    c.export = False
    return c
