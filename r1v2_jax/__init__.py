"""r1v2-jax: Skywork R1V2 (InternViT-6B -> MLP adapter -> QwQ-32B) and its hybrid RL in JAX/Flax."""

from r1v2_jax.convert.keymap import CheckpointKeyError
from r1v2_jax.convert.pretrained import load_checkpoint, load_model, load_pretrained, save_released
from r1v2_jax.model.config import ConfigError, ModelConfig, TextConfig, VisionConfig, get_preset, model_config
from r1v2_jax.model.vlm import (
                            R1V2,
                            R1V2Model,
                            abstract_params,
                            count_params,
                            init_model,
                            init_params,
                            merge_image_features,
                            param_shardings,
)
from r1v2_jax.parallel.sharding import DEFAULT_RULES, make_mesh
from r1v2_jax.sampling.sampler import SampleOutput, Sampler, SamplingParams, generate

__version__ = "0.1.0"

__all__ = [
    "CheckpointKeyError", "ConfigError", "DEFAULT_RULES", "ModelConfig", "R1V2", "R1V2Model", "SampleOutput",
    "Sampler", "SamplingParams", "TextConfig", "generate",
    "VisionConfig", "abstract_params", "count_params", "get_preset", "init_model", "init_params",
    "load_checkpoint", "load_model", "load_pretrained", "make_mesh", "save_released", "merge_image_features", "model_config", "param_shardings",
]
