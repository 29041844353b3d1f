"""The jitted rollout sampler."""
