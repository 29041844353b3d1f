"""Training stages: one module per stage (sft, mpo, grpo, rm)."""
