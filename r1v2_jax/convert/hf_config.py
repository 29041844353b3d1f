"""Build a :class:`ModelConfig` from a released checkpoint's ``config.json`` (InternVL-Chat format).

Every field that shapes the computation is read and validated; values we do not implement
(a rope scaling, sliding-window attention, MoE ViT layers, another activation) are refused
with an error naming the file and the field. Keys that only matter to PyTorch/transformers
(generation defaults, dropout rates, flash-attention switches, ...) are known and ignored. A
key that is neither is refused unless ``strict=False``, so that a format change cannot slip by
silently.

Numbers are validated before the model sees them (a hostile or corrupt ``config.json`` must
not build a model that computes garbage or allocates without bound): sizes are integers
within :data:`SIZE_BOUNDS`, norm epsilons are finite and in (0, 1), ``rope_theta`` and
``downsample_ratio`` are finite and positive (JSON's ``NaN`` / ``Infinity`` are refused).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from r1v2_jax.model.config import ConfigError, ModelConfig, TextConfig, VisionConfig

IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"

# Attributes every transformers PretrainedConfig serialises (generation defaults, bookkeeping).
_HF_GENERIC = {
    "_name_or_path",
    "_attn_implementation_autoset",
    "_commit_hash",
    "add_cross_attention",
    "architectures",
    "attn_implementation",
    "auto_map",
    "bad_words_ids",
    "begin_suppress_tokens",
    "bos_token_id",
    "chunk_size_feed_forward",
    "cross_attention_hidden_size",
    "decoder_start_token_id",
    "diversity_penalty",
    "do_sample",
    "dtype",
    "early_stopping",
    "encoder_no_repeat_ngram_size",
    "eos_token_id",
    "exponential_decay_length_penalty",
    "finetuning_task",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "id2label",
    "initializer_range",
    "is_decoder",
    "is_encoder_decoder",
    "label2id",
    "length_penalty",
    "max_length",
    "min_length",
    "model_type",
    "no_repeat_ngram_size",
    "num_beam_groups",
    "num_beams",
    "num_return_sequences",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "pad_token_id",
    "prefix",
    "problem_type",
    "pruned_heads",
    "remove_invalid_values",
    "repetition_penalty",
    "return_dict",
    "return_dict_in_generate",
    "sep_token_id",
    "suppress_tokens",
    "task_specific_params",
    "temperature",
    "tf_legacy_loss",
    "tie_encoder_decoder",
    "tokenizer_class",
    "top_k",
    "top_p",
    "torch_dtype",
    "torchscript",
    "transformers_version",
    "typical_p",
    "use_bfloat16",
    "use_cache",
    "gradient_checkpointing",
}
# InternViT keys that do not change inference (training-only or kernel choices), and the MoE
# fields of InternViT variants (accepted only while use_moe is false).
_VISION_IGNORED = {
    "dropout",
    "drop_path_rate",
    "attention_dropout",
    "initializer_factor",
    "use_flash_attn",
    "capacity_factor",
    "eval_capacity_factor",
    "laux_allreduce",
    "moe_coeff_ratio",
    "moe_intermediate_size",
    "moe_output_scale",
    "noisy_gate_policy",
    "num_experts",
    "num_routed_experts",
    "num_shared_experts",
    "shared_expert_intermediate_size",
    "use_residual",
    "use_rts",
    "use_weighted_residual",
    "use_moe",
}
_VISION_READ = {
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "image_size",
    "patch_size",
    "num_channels",
    "norm_type",
    "layer_norm_eps",
    "qkv_bias",
    "qk_normalization",
    "hidden_act",
}
_TEXT_IGNORED = {
    "attention_dropout",
    "max_window_layers",
    "sliding_window",
    "use_sliding_window",
    "rope_scaling",
    "layer_types",
    "attn_implementation",
    "rope_parameters",
    "bias",
}
_TEXT_READ = {
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
    "tie_word_embeddings",
    "hidden_act",
    "head_dim",
}
_TOP_IGNORED = {
    "template",
    "dynamic_image_size",
    "use_thumbnail",
    "max_dynamic_patch",
    "min_dynamic_patch",
    "use_backbone_lora",
    "use_llm_lora",
    "pad2square",
    "image_fold",
    "hidden_size",
    "system_message",
    "use_flash_attn",
    "tie_word_embeddings",
}
_TOP_READ = {"vision_config", "llm_config", "downsample_ratio", "ps_version", "select_layer", "force_image_size"}


# Upper bounds on sizes read from config.json: far above any released model (R1V2-38B: widths
# <= 27648, 64 layers, 40 heads, vocab 152064, 32k positions), far below what would overflow.
SIZE_BOUNDS = {
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 19,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "vocab_size": 1 << 22,
    "max_position_embeddings": 1 << 24,
    "head_dim": 4096,
    "image_size": 8192,
    "patch_size": 8192,
    "num_channels": 16,
    "force_image_size": 8192,
}


def _err(file: str, field: str, msg: str) -> ConfigError:
    return ConfigError(f"{file}: {field}: {msg}")


def _require(d: Mapping[str, Any], key: str, file: str, where: str, kind=int):
    if key not in d:
        raise _err(file, f"{where}.{key}", "missing")
    v = d[key]
    ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
    if kind is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if not ok:
        raise _err(file, f"{where}.{key}", f"expected {kind.__name__}, got {v!r}")
    return v


def _size(d: Mapping[str, Any], key: str, file: str, where: str, default: Any = None) -> int:
    """A size field: an integer in [1, SIZE_BOUNDS[key]] (``default`` when absent, if given)."""
    if key not in d and default is not None:
        return default
    v = _require(d, key, file, where)
    if not 1 <= v <= SIZE_BOUNDS[key]:
        raise _err(file, f"{where}.{key}", f"must be an integer in [1, {SIZE_BOUNDS[key]}], got {v!r}")
    return v


def _number(d: Mapping[str, Any], key: str, file: str, where: str, default: float, below_one: bool = False) -> float:
    """A positive finite number (``below_one``: also < 1, as a norm epsilon)."""
    v = d.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise _err(file, f"{where}.{key}", f"expected a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v) or v <= 0 or (below_one and v >= 1):
        rng = "in (0, 1)" if below_one else "positive"
        raise _err(file, f"{where}.{key}", f"must be finite and {rng}, got {v!r}")
    return v


def _check_unknown(d, read, ignored, file, where, strict):
    unknown = sorted(set(d) - read - ignored - _HF_GENERIC)
    if unknown and strict:
        raise _err(
            file,
            where,
            f"unknown key(s) {unknown}: not part of the InternVL-Chat/Qwen2 format this "
            "reader knows; pass strict=False to ignore them",
        )


def _vision(d: Mapping[str, Any], file: str, strict: bool) -> VisionConfig:
    w = "vision_config"
    _check_unknown(d, _VISION_READ, _VISION_IGNORED, file, w, strict)
    if d.get("use_moe", False):
        raise _err(file, f"{w}.use_moe", "MoE vision layers are not supported (expected false)")
    act = d.get("hidden_act", "gelu")
    if act != "gelu":
        raise _err(file, f"{w}.hidden_act", f"expected 'gelu' (exact erf GELU), got {act!r}")
    norm = d.get("norm_type", "rms_norm")
    if norm not in ("rms_norm", "layer_norm"):
        raise _err(file, f"{w}.norm_type", f"expected 'rms_norm' or 'layer_norm', got {norm!r}")
    image_size = d.get("image_size", 448)
    patch_size = d.get("patch_size", 14)
    for name, v in (("image_size", image_size), ("patch_size", patch_size)):
        if isinstance(v, (list, tuple)) and (len(v) != 2 or v[0] != v[1]):
            raise _err(file, f"{w}.{name}", f"only square sizes are supported, got {v!r}")
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    patch_size = patch_size[0] if isinstance(patch_size, (list, tuple)) else patch_size
    image_size = _size({"image_size": image_size}, "image_size", file, w)
    patch_size = _size({"patch_size": patch_size}, "patch_size", file, w)
    try:
        return VisionConfig(
            hidden_size=_size(d, "hidden_size", file, w),
            num_layers=_size(d, "num_hidden_layers", file, w),
            num_heads=_size(d, "num_attention_heads", file, w),
            intermediate_size=_size(d, "intermediate_size", file, w),
            image_size=image_size,
            patch_size=patch_size,
            num_channels=_size(d, "num_channels", file, w, default=3),
            norm_type=norm,
            norm_eps=_number(d, "layer_norm_eps", file, w, 1e-6, below_one=True),
            qkv_bias=bool(d.get("qkv_bias", False)),
            qk_norm=bool(d.get("qk_normalization", True)),
        )
    except ConfigError as e:
        if str(e).startswith(f"{file}: "):  # already names the file (a field checked here)
            raise
        raise ConfigError(f"{file}: {e}") from None


def _text(d: Mapping[str, Any], file: str, strict: bool) -> TextConfig:
    w = "llm_config"
    _check_unknown(d, _TEXT_READ, _TEXT_IGNORED, file, w, strict)
    mt = d.get("model_type", "qwen2")
    if mt != "qwen2":
        raise _err(file, f"{w}.model_type", f"expected 'qwen2', got {mt!r}")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise _err(file, f"{w}.hidden_act", f"expected 'silu' (SwiGLU), got {act!r}")
    if d.get("use_sliding_window", False):
        raise _err(file, f"{w}.use_sliding_window", "sliding-window attention is not supported (expected false)")
    rs = d.get("rope_scaling")
    if rs not in (None, {}) and not (isinstance(rs, dict) and rs.get("rope_type", rs.get("type")) == "default"):
        raise _err(file, f"{w}.rope_scaling", f"only plain RoPE is supported, got {rs!r}")
    theta = d.get("rope_theta")
    rp = d.get("rope_parameters")
    if isinstance(rp, dict):
        if rp.get("rope_type", "default") != "default":
            raise _err(file, f"{w}.rope_parameters", f"only plain RoPE is supported, got {rp!r}")
        theta = rp.get("rope_theta", theta)
    if theta is None:
        raise _err(file, f"{w}.rope_theta", "missing")
    heads = _size(d, "num_attention_heads", file, w)
    try:
        return TextConfig(
            vocab_size=_size(d, "vocab_size", file, w),
            hidden_size=_size(d, "hidden_size", file, w),
            num_layers=_size(d, "num_hidden_layers", file, w),
            num_heads=heads,
            num_kv_heads=_size(d, "num_key_value_heads", file, w, default=heads),
            intermediate_size=_size(d, "intermediate_size", file, w),
            head_dim=None if d.get("head_dim") is None else _size(d, "head_dim", file, w),
            rms_norm_eps=_number(d, "rms_norm_eps", file, w, 1e-6, below_one=True),
            rope_theta=_number({"rope_theta": theta}, "rope_theta", file, w, 0.0),
            max_position_embeddings=_size(d, "max_position_embeddings", file, w, default=32768),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )
    except ConfigError as e:
        if str(e).startswith(f"{file}: "):  # already names the file (a field checked here)
            raise
        raise ConfigError(f"{file}: {e}") from None


def config_from_dict(
    d: Mapping[str, Any], *, image_token_id: int, file: str = "config.json", strict: bool = True, **run_options
) -> ModelConfig:
    """The ModelConfig described by a parsed InternVL-Chat ``config.json``.

    ``run_options`` (dtype, param_dtype, scan_layers, remat_policy) set how the model runs.
    """
    if not isinstance(d, Mapping):
        raise _err(file, "<top level>", f"expected a JSON object, got {type(d).__name__}")
    mt = d.get("model_type")
    if mt not in ("internvl_chat", "skywork_chat", None):
        raise _err(file, "model_type", f"expected 'internvl_chat' (the released R1V2 format), got {mt!r}")
    _check_unknown(d, _TOP_READ, _TOP_IGNORED, file, "<top level>", strict)
    for sec in ("vision_config", "llm_config"):
        if not isinstance(d.get(sec), Mapping):
            raise _err(file, sec, "missing or not an object")
    ps = d.get("ps_version", "v1")
    if ps not in ("v1", "v2"):
        raise _err(file, "ps_version", f"expected 'v1' or 'v2', got {ps!r}")
    force = d.get("force_image_size")
    if force is not None and (
        not isinstance(force, int) or isinstance(force, bool) or not 1 <= force <= SIZE_BOUNDS["force_image_size"]
    ):
        raise _err(
            file,
            "force_image_size",
            f"expected an integer in [1, {SIZE_BOUNDS['force_image_size']}] or null, got {force!r}",
        )
    select = d.get("select_layer", -1)
    if not isinstance(select, int) or isinstance(select, bool):
        raise _err(file, "select_layer", f"expected an integer, got {select!r}")
    ratio = d.get("downsample_ratio", 0.5)
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not math.isfinite(ratio) or ratio <= 0:
        raise _err(file, "downsample_ratio", f"expected a finite positive number, got {ratio!r}")
    vision = _vision(d["vision_config"], file, strict)
    text = _text(d["llm_config"], file, strict)
    if force == vision.image_size:
        force = None  # the ViT's own size: nothing forced
    try:
        return ModelConfig(
            vision=vision,
            text=text,
            image_token_id=image_token_id,
            downsample_ratio=float(ratio),
            ps_version=ps,
            select_layer=select,
            force_image_size=force,
            **run_options,
        )
    except ConfigError as e:
        if str(e).startswith(f"{file}: "):  # already names the file (a field checked here)
            raise
        raise ConfigError(f"{file}: {e}") from None


def find_token_id(model_dir: str | os.PathLike, token: str = IMG_CONTEXT_TOKEN) -> int | None:
    """The id of ``token`` from the tokenizer files of an HF directory, or None if absent.

    Looks in ``tokenizer.json`` (added_tokens, then the model vocab), ``added_tokens.json``,
    ``tokenizer_config.json`` (added_tokens_decoder) and ``vocab.json``; no tokenizer library
    is needed.
    """
    d = os.fspath(model_dir)

    def load(name):
        p = os.path.join(d, name)
        if not os.path.exists(p):
            return None
        try:
            with open(p, encoding="utf-8") as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: invalid JSON ({e})") from None

    tj = load("tokenizer.json")
    if isinstance(tj, dict):
        for t in tj.get("added_tokens", []) or []:
            if t.get("content") == token:
                return int(t["id"])
        vocab = (tj.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and token in vocab:
            return int(vocab[token])
    at = load("added_tokens.json")
    if isinstance(at, dict) and token in at:
        return int(at[token])
    tc = load("tokenizer_config.json")
    if isinstance(tc, dict):
        for i, t in (tc.get("added_tokens_decoder") or {}).items():
            if isinstance(t, dict) and t.get("content") == token:
                return int(i)
    vj = load("vocab.json")
    if isinstance(vj, dict) and token in vj:
        return int(vj[token])
    return None


def read_config(
    model_dir: str | os.PathLike, *, image_token_id: int | None = None, strict: bool = True, **run_options
) -> ModelConfig:
    """Read ``config.json`` (and the ``<IMG_CONTEXT>`` id from the tokenizer files) of a released
    checkpoint directory. ``image_token_id`` overrides the tokenizer lookup."""
    path = os.path.join(os.fspath(model_dir), "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{path}: not found (a released checkpoint directory has a config.json)")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    if image_token_id is None:
        image_token_id = find_token_id(model_dir)
        if image_token_id is None:
            raise ConfigError(f"{model_dir}: no tokenizer file defines {IMG_CONTEXT_TOKEN}; pass image_token_id=")
    return config_from_dict(d, image_token_id=image_token_id, file=path, strict=strict, **run_options)
