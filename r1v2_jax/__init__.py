"""r1v2-jax: Skywork R1V2 (InternViT-6B -> MLP adapter -> QwQ-32B) and its hybrid RL in JAX/Flax.

The public names below are imported on first use (PEP 562), so importing a light submodule
(``r1v2_jax.rewards.verifier`` in the answer checker's worker processes, ``r1v2_jax.cli`` to
parse arguments) does not import JAX and the model first.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "r1v2_jax.model.config": ("ConfigError", "ModelConfig", "TextConfig", "VisionConfig", "get_preset", "model_config"),
    "r1v2_jax.convert.keymap": ("CheckpointKeyError",),
    "r1v2_jax.model.vlm": (
        "R1V2",
        "R1V2Model",
        "abstract_params",
        "count_params",
        "init_model",
        "init_params",
        "merge_image_features",
        "param_shardings",
    ),
    "r1v2_jax.convert.pretrained": ("load_checkpoint", "load_model", "load_pretrained", "save_released"),
    "r1v2_jax.sampling.sampler": ("SampleOutput", "Sampler", "SamplingParams", "generate"),
    "r1v2_jax.parallel.sharding": ("DEFAULT_RULES", "make_mesh"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'r1v2_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
