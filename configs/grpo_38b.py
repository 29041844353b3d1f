"""GRPO with SSB on the released 38B model (R1V2's recipe: G=8, 8k completions, lr 1e-6,
temperature 1.0, adapter-only training). Set model.init to the converted checkpoint and
data.path to a folder with train.jsonl / test.jsonl (``rl`` records)."""

from r1v2_jax.experiments import demo_config


def get_config():
    c = demo_config()
    c.run_dir = "runs/grpo_38b"
    c.stages = ("grpo",)
    c.model.preset = "r1v2_38b"
    c.model.init = "/path/to/r1v2-38b-ckpt"  # hf_to_jax output or the released HF directory
    c.data.path = "/path/to/data"
    c.data.synthetic_n = 0
    c.data.batch_size = 32  # prompts per step (x G = 256 rollouts)
    c.data.max_prompt_len = 4096
    c.data.max_completion_len = 8192
    c.data.dynamic_tiling = True
    c.data.max_tiles = 6
    c.grpo.steps = 1000
    c.grpo.lr = 1e-6
    c.grpo.trainable = "adapter"
    c.grpo.group_size = 8
    c.grpo.max_new_tokens = 8192
    c.grpo.temperature = 1.0
    c.grpo.micro_batches = 16  # 16 rollouts per micro-batch: one per device of a 16-way FSDP axis
    c.grpo.ssb_capacity = 1024
    c.eval.max_new_tokens = 8192
    c.checkpoint.every = 50
    c.plan.mesh = (1, -1, 4)  # FSDP across chips, 4-way tensor parallelism within a host
    c.plan.tiles_per_sample = 7  # 6 dynamic tiles + thumbnail
    c.export = False
    return c
