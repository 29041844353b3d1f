"""The two PyTorch formats of this model and how they relate.

* **released**: the InternVL-Chat layout of ``Skywork/Skywork-R1V2-38B`` (remote code,
  ``config.json`` with ``vision_config`` / ``llm_config``, fused ViT ``qkv``).
* **transformers**: the native ``InternVLForConditionalGeneration`` (no remote code, separate
  q/k/v, other key names, ``text_config``).

Both directions of the key renaming and the qkv fusing are here, along with writers of each
format's ``config.json`` from a :class:`ModelConfig`. Arrays may be numpy or torch tensors
(only slicing and concatenation are used).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator, Mapping

from r1v2_jax.model.config import ModelConfig

# (native regex, released template); applied in order, first match wins.
_RENAMES = [
    (r"model\.vision_tower\.embeddings\.cls_token", "vision_model.embeddings.class_embedding"),
    (
        r"model\.vision_tower\.embeddings\.patch_embeddings\.projection\.(weight|bias)",
        r"vision_model.embeddings.patch_embedding.\1",
    ),
    (r"model\.vision_tower\.embeddings\.position_embeddings", "vision_model.embeddings.position_embedding"),
    (
        r"model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.projection_layer\.(weight|bias)",
        r"vision_model.encoder.layers.\1.attn.proj.\2",
    ),
    (
        r"model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.(q_norm|k_norm)\.(weight|bias)",
        r"vision_model.encoder.layers.\1.attn.\2.\3",
    ),
    (
        r"model\.vision_tower\.encoder\.layer\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)",
        r"vision_model.encoder.layers.\1.mlp.\2.\3",
    ),
    (
        r"model\.vision_tower\.encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)",
        r"vision_model.encoder.layers.\1.norm1.\2",
    ),
    (
        r"model\.vision_tower\.encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)",
        r"vision_model.encoder.layers.\1.norm2.\2",
    ),
    (r"model\.vision_tower\.encoder\.layer\.(\d+)\.lambda_1", r"vision_model.encoder.layers.\1.ls1"),
    (r"model\.vision_tower\.encoder\.layer\.(\d+)\.lambda_2", r"vision_model.encoder.layers.\1.ls2"),
    (r"model\.multi_modal_projector\.layer_norm\.(weight|bias)", r"mlp1.0.\1"),
    (r"model\.multi_modal_projector\.linear_1\.(weight|bias)", r"mlp1.1.\1"),
    (r"model\.multi_modal_projector\.linear_2\.(weight|bias)", r"mlp1.3.\1"),
    (r"model\.language_model\.(.+)", r"language_model.model.\1"),
    (r"lm_head\.weight", "language_model.lm_head.weight"),
]
_NATIVE_QKV = re.compile(r"model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)")
_RELEASED_QKV = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)")


def _inverse_renames():
    out = []
    for pat, tmpl in _RENAMES:
        # Turn "a.(x|y).b" + template "c.\1.d" into the reverse pair by swapping groups.
        groups = re.findall(r"\([^)]*\)", pat)
        inv_pat = re.escape(tmpl)
        for k, g in enumerate(groups, 1):
            inv_pat = inv_pat.replace(re.escape(f"\\{k}"), g)
        inv_tmpl = pat
        for k, g in enumerate(groups, 1):
            inv_tmpl = inv_tmpl.replace(g, f"\\{k}", 1)
        out.append((inv_pat, inv_tmpl.replace("\\.", ".")))
    return out


_INVERSE = _inverse_renames()


def _rename(key: str, table) -> str | None:
    for pat, tmpl in table:
        if re.fullmatch(pat, key):
            return re.sub(pat, tmpl, key)
    return None


def native_to_released(tensors: Mapping[str, Any], concat: Callable) -> Iterator[tuple[str, Any]]:
    """Yield released (key, tensor) from a native transformers state dict.

    ``concat(list, axis)`` joins q/k/v (``torch.cat`` / ``np.concatenate``)."""
    qkv: dict[tuple[str, str], dict[str, Any]] = {}
    for k, v in tensors.items():
        m = _NATIVE_QKV.fullmatch(k)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
            continue
        new = _rename(k, _RENAMES)
        if new is None:
            raise KeyError(f"native key {k!r} has no released counterpart")
        yield new, v
    for (layer, kind), parts in sorted(qkv.items(), key=lambda kv: (int(kv[0][0]), kv[0][1])):
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"vision layer {layer}: {kind} of q/k/v incomplete, have {sorted(parts)}")
        yield f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}", concat([parts["q"], parts["k"], parts["v"]], 0)


def native_parts(key: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], slice | None]]:
    """The native transformers tensors one released tensor becomes: (native key, shape, row
    slice of the released tensor or None for the whole)."""
    m = _RELEASED_QKV.fullmatch(key)
    if m:
        d = shape[0] // 3
        return [
            (
                f"model.vision_tower.encoder.layer.{m.group(1)}.attention.{name}_proj.{m.group(2)}",
                (d,) + tuple(shape[1:]),
                slice(j * d, (j + 1) * d),
            )
            for j, name in enumerate("qkv")
        ]
    new = _rename(key, _INVERSE)
    if new is None:
        raise KeyError(f"released key {key!r} has no native transformers counterpart")
    return [(new, tuple(shape), None)]


def released_to_native(tensors: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """Yield native transformers (key, tensor) from released tensors (qkv split in three)."""
    for k, v in tensors.items():
        for new, _, rows in native_parts(k, tuple(v.shape)):
            yield new, v if rows is None else v[rows]


def _qwen2_fields(t) -> dict:
    """The Qwen2 config fields both formats share."""
    return {
        "model_type": "qwen2",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "intermediate_size": t.intermediate_size,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "max_position_embeddings": t.max_position_embeddings,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        **({"head_dim": t.head_dim} if t.head_dim is not None else {}),
    }


def released_config_dict(c: ModelConfig, torch_dtype: str = "bfloat16") -> dict:
    """The InternVL-Chat ``config.json`` of the released format for this config."""
    v, t = c.vision, c.text
    return {
        "architectures": ["SkyworkChatModel"],
        "model_type": "internvl_chat",
        "torch_dtype": torch_dtype,
        "downsample_ratio": c.downsample_ratio,
        "ps_version": c.ps_version,
        "select_layer": c.select_layer,
        "force_image_size": c.force_image_size if c.force_image_size is not None else v.image_size,
        "template": "r1v2",
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "pad2square": False,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads,
            "intermediate_size": v.intermediate_size,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "num_channels": v.num_channels,
            "norm_type": v.norm_type,
            "layer_norm_eps": v.norm_eps,
            "qkv_bias": v.qkv_bias,
            "qk_normalization": v.qk_norm,
            "hidden_act": "gelu",
            "initializer_factor": v.layer_scale_init,
            "use_flash_attn": False,
            "drop_path_rate": 0.0,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "torch_dtype": torch_dtype,
        },
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"],
            **_qwen2_fields(t),
            "use_sliding_window": False,
            "rope_scaling": None,
            "attention_dropout": 0.0,
            "torch_dtype": torch_dtype,
        },
    }


def native_config_dict(c: ModelConfig, torch_dtype: str = "bfloat16") -> dict:
    """The ``config.json`` of transformers' native ``InternVLForConditionalGeneration``."""
    v, t = c.vision, c.text
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "torch_dtype": torch_dtype,
        "image_token_id": c.image_token_id,
        "image_seq_length": c.tokens_per_tile(),
        "downsample_ratio": c.downsample_ratio,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": c.select_layer,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "vision_config": {
            "model_type": "internvl_vision",
            "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads,
            "intermediate_size": v.intermediate_size,
            "image_size": [v.image_size, v.image_size],
            "patch_size": [v.patch_size, v.patch_size],
            "num_channels": v.num_channels,
            "norm_type": v.norm_type,
            "layer_norm_eps": v.norm_eps,
            "attention_bias": v.qkv_bias,
            "use_qk_norm": v.qk_norm,
            "layer_scale_init_value": v.layer_scale_init,
            "hidden_act": "gelu",
            "use_mean_pooling": True,
            "use_absolute_position_embeddings": True,
        },
        "text_config": _qwen2_fields(t),
    }
