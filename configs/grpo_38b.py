"""GRPO with SSB on the released 38B model (R1V2's recipe: G=8, 8k completions, lr 1e-6,
temperature 1.0, adapter-only training). Set model.init to the converted checkpoint and
data.path to a folder with train.jsonl / test.jsonl (``rl`` records)."""

from r1v2_jax.train.experiment import released_38b_config


def get_config():
    c = released_38b_config("grpo")
    c.data.batch_size = 32  # prompts per step (x G = 256 rollouts)
    c.grpo.steps = 1000
    c.grpo.optim.lr = 1e-6
    c.grpo.optim.trainable = "adapter"
    c.grpo.group_size = 8
    c.grpo.max_new_tokens = 8192
    c.grpo.temperature = 1.0
    c.grpo.micro_batches = 16  # 16 rollouts per micro-batch: one per device of a 16-way FSDP axis
    c.grpo.ssb.capacity = 1024
    c.eval.max_new_tokens = 8192
    return c
