"""PyTorch references for parity tests: transformers models built from our configs, with
random non-trivial weights, and writers of released-format checkpoint directories."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from r1v2_jax.convert.transformers_format import native_config_dict, native_to_released, released_config_dict
from r1v2_jax.model.config import ModelConfig


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: norms around 1, layer scales and biases away from their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith(
                (
                    "norm.weight",
                    "layernorm_before.weight",
                    "layernorm_after.weight",
                    "input_layernorm.weight",
                    "post_attention_layernorm.weight",
                    "layer_norm.weight",
                    "q_norm.weight",
                    "k_norm.weight",
                )
            ):
                p.copy_(1.0 + 0.2 * r)
            elif "lambda_" in name:
                p.copy_(0.1 + 0.3 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            elif "position_embeddings" in name or "cls_token" in name:
                p.copy_(0.5 * r)
            else:
                fan_in = p.shape[-1] if p.ndim >= 2 else 1
                if p.ndim == 4:
                    fan_in = int(np.prod(p.shape[1:]))
                p.copy_(r / np.sqrt(fan_in) * (1.0 if "embed_tokens" not in name else 1.0))


def internvl_reference(config: ModelConfig, seed: int = 0):
    """A native transformers InternVLForConditionalGeneration configured like ``config``."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    d = native_config_dict(config, torch_dtype="float32")
    hf_cfg = InternVLConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type", "torch_dtype")})
    hf_cfg._attn_implementation = "eager"
    hf_cfg.vision_config._attn_implementation = "eager"
    hf_cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(hf_cfg).eval()
    _randomize(model, seed)
    return model


def write_released(
    model: torch.nn.Module, config: ModelConfig, out_dir: str, *, dtype=torch.float32, num_shards: int = 1
) -> str:
    """Write ``model`` (native transformers) as a released-format directory: safetensors
    (``num_shards`` files + index when > 1), config.json and a tokenizer_config.json that
    defines <IMG_CONTEXT>."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    released = dict(native_to_released(sd, lambda xs, axis: torch.cat(xs, dim=axis)))
    released = {k: v.contiguous() for k, v in released.items()}
    keys = sorted(released)
    if num_shards == 1:
        save_file(released, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        chunks = np.array_split(np.arange(len(keys)), num_shards)
        weight_map = {}
        for s, idx in enumerate(chunks):
            fn = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
            part = {keys[i]: released[keys[i]] for i in idx}
            save_file(part, os.path.join(out_dir, fn), metadata={"format": "pt"})
            weight_map.update({k: fn for k in part})
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(released_config_dict(config, torch_dtype=str(dtype).replace("torch.", "")), f, indent=2)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(
            {"added_tokens_decoder": {str(config.image_token_id): {"content": "<IMG_CONTEXT>", "special": True}}}, f
        )
    return out_dir
