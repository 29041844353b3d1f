"""Skywork-VL-Reward's released files <-> our reward-model parameter tree, streaming.

The release is a Qwen2.5-VL checkpoint (``config.json``, ``model.safetensors`` or shards +
``model.safetensors.index.json``) plus a separate ``value_head.safetensors`` in TRL's
value-head format (``v_head.summary.weight`` [1, H], ``v_head.summary.bias`` [1]).

Two key namings are read (detected from the keys; a mixture is refused as unexpected keys):

    naming "v4": the on-disk names of Qwen2.5-VL checkpoints, those of the release (saved
        with transformers 4.x) and those transformers 5 still writes in save_pretrained
        visual.patch_embed.proj.weight, visual.blocks.{i}..., visual.merger...,
        model.embed_tokens.weight, model.layers.{i}..., model.norm.weight, lm_head.weight
    naming "v5": the in-memory (state_dict) names of transformers >= 4.52, found in files
        written from a state dict directly
        model.visual.*, model.language_model.*, lm_head.weight

``lm_head.weight`` is optional (a reward model needs only the hidden states; the config gets
``lm_head`` set from its presence). The value head is read from ``value_head.safetensors``
or, when that file is absent, from the main shards if they hold the ``v_head.summary.*``
keys. Every missing key, unexpected key, wrong shape and non-float dtype is reported at
once, naming the file and key, before any tensor is read. :func:`export_skywork_vl` writes
the same layout back, tensor for tensor (a bitwise round trip for the stored dtype).

    released key                                ours (scan layout; "block_{i}" unrolled)
    visual.patch_embed.proj.weight [D,C,T,P,P]  backbone/visual/patch_embed/kernel [C·T·P·P, D]
    visual.blocks.{i}.attn.qkv.weight           backbone/visual/layers/block/attn/qkv/kernel[i]  (transposed)
    visual.merger.mlp.0 / .2                    backbone/visual/merger/fc1 / fc2
    model.layers.{i}.self_attn.q_proj.weight    backbone/language_model/layers/block/self_attn/q_proj/kernel[i]
    v_head.summary.weight [1, H]                value_head/kernel [H, 1]
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from r1v2_jax.convert.keymap import (
    IDENTITY,
    LINEAR,
    QWEN2_LAYER,
    CheckpointKeyError,
    KeyEntry,
    Transform,
    _unflatten,
)
from r1v2_jax.convert.safetensors_io import (
    SafetensorsDir,
    SafetensorsFile,
    write_safetensors_dir,
    write_safetensors_file,
)
from r1v2_jax.model.config import ConfigError, TextConfig
from r1v2_jax.model.qwen2_5_vl import QwenVisionConfig, QwenVLConfig, abstract_qwen_vl_params

VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_KEYS = ("v_head.summary.weight", "v_head.summary.bias")
NAMINGS = {"v4": ("visual.", "model."), "v5": ("model.visual.", "model.language_model.")}
FLOAT_CODES = ("F32", "BF16", "F16")

_VISION_LAYER = [  # under <vision>blocks.{i}. <-> visual/layers/block
    ("norm1.weight", "norm1/scale", IDENTITY),
    ("norm2.weight", "norm2/scale", IDENTITY),
    ("attn.qkv.weight", "attn/qkv/kernel", LINEAR),
    ("attn.qkv.bias", "attn/qkv/bias", IDENTITY),
    ("attn.proj.weight", "attn/proj/kernel", LINEAR),
    ("attn.proj.bias", "attn/proj/bias", IDENTITY),
    ("mlp.gate_proj.weight", "mlp/gate_proj/kernel", LINEAR),
    ("mlp.gate_proj.bias", "mlp/gate_proj/bias", IDENTITY),
    ("mlp.up_proj.weight", "mlp/up_proj/kernel", LINEAR),
    ("mlp.up_proj.bias", "mlp/up_proj/bias", IDENTITY),
    ("mlp.down_proj.weight", "mlp/down_proj/kernel", LINEAR),
    ("mlp.down_proj.bias", "mlp/down_proj/bias", IDENTITY),
]
_MERGER = [
    ("merger.ln_q.weight", "visual/merger/ln_q/scale", IDENTITY),
    ("merger.mlp.0.weight", "visual/merger/fc1/kernel", LINEAR),
    ("merger.mlp.0.bias", "visual/merger/fc1/bias", IDENTITY),
    ("merger.mlp.2.weight", "visual/merger/fc2/kernel", LINEAR),
    ("merger.mlp.2.bias", "visual/merger/fc2/bias", IDENTITY),
]


def _patch_transform(c: QwenVisionConfig) -> Transform:
    """Conv3d weight [D, C, T, P, P] <-> our patch-embedding kernel [C·T·P·P, D]."""
    tail = (c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
    return Transform(
        "conv3d",
        lambda x: x.reshape(x.shape[0], -1).T,
        lambda x: x.T.reshape((x.shape[1],) + tail),
        lambda s: (s[1],) + tail,
    )


def key_entries(config: QwenVLConfig, naming: str = "v4") -> tuple[KeyEntry, ...]:
    """Every released tensor of the reward model (backbone, optional LM head, value head) in
    checkpoint order; paths are in the reward model's tree (``backbone/...``, ``value_head/...``)."""
    if naming not in NAMINGS:
        raise ValueError(f"naming: expected one of {sorted(NAMINGS)}, got {naming!r}")
    vis, txt = NAMINGS[naming]
    flat = {
        tuple(k.key for k in kp): tuple(v.shape)
        for kp, v in jax.tree_util.tree_flatten_with_path(abstract_qwen_vl_params(config))[0]
    }
    entries: list[KeyEntry] = []
    covered: set[tuple[str, ...]] = set()

    def add(key, path, tr, layer=None):
        p = tuple(path.split("/"))
        if p not in flat:
            raise AssertionError(f"key map: {path} is not in the parameter tree")
        shape = flat[p][1:] if layer is not None else flat[p]
        entries.append(KeyEntry(key, ("backbone",) + p, layer, tr, tr.released_shape(shape)))
        covered.add(p)

    def tower(prefix, stack, rules, n):
        for i in range(n):
            for key, path, tr in rules:
                if config.scan_layers:
                    add(f"{prefix}{i}.{key}", f"{stack}/block/{path}", tr, i)
                else:
                    add(f"{prefix}{i}.{key}", f"{stack}/block_{i}/{path}", tr)

    add(f"{vis}patch_embed.proj.weight", "visual/patch_embed/kernel", _patch_transform(config.vision))
    tower(f"{vis}blocks.", "visual/layers", _VISION_LAYER, config.vision.depth)
    for key, path, tr in _MERGER:
        add(vis + key, path, tr)
    add(f"{txt}embed_tokens.weight", "language_model/embed_tokens/embedding", IDENTITY)
    tower(f"{txt}layers.", "language_model/layers", QWEN2_LAYER, config.text.num_layers)
    add(f"{txt}norm.weight", "language_model/norm/scale", IDENTITY)
    if config.lm_head:
        add("lm_head.weight", "language_model/lm_head/kernel", LINEAR)
    missing = sorted("/".join(p) for p in set(flat) - covered)
    if missing:
        raise AssertionError(f"key map: parameters with no released key: {missing}")
    h = config.text.hidden_size
    entries.append(KeyEntry(VALUE_HEAD_KEYS[0], ("value_head", "kernel"), None, LINEAR, (1, h)))
    entries.append(KeyEntry(VALUE_HEAD_KEYS[1], ("value_head", "bias"), None, IDENTITY, (1,)))
    return tuple(entries)


# --- config.json ----------------------------------------------------------------------------


def _get(d: Mapping[str, Any], key: str, file: str, where: str, kind=int):
    if key not in d:
        raise ConfigError(f"{file}: {where}{key}: required field is missing")
    v = d[key]
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise ConfigError(f"{file}: {where}{key}: expected an integer, got {v!r}")
    if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise ConfigError(f"{file}: {where}{key}: expected a number, got {v!r}")
    return v


def config_from_dict(d: Mapping[str, Any], file: str = "config.json", **run) -> QwenVLConfig:
    """A :class:`QwenVLConfig` from a Qwen2.5-VL ``config.json`` (text fields at the top level,
    transformers 4.x, or under ``text_config``, 5.x; ``rope_scaling`` or ``rope_parameters``).
    ``run``: how it runs (dtype, scan_layers, attention_impl, ...)."""
    mt = d.get("model_type")
    if mt not in ("qwen2_5_vl", None):
        raise ConfigError(f"{file}: model_type: expected 'qwen2_5_vl', got {mt!r}")
    t = d.get("text_config") or d
    tw = "text_config." if "text_config" in d and d["text_config"] else ""
    v = d.get("vision_config")
    if not isinstance(v, Mapping):
        raise ConfigError(f"{file}: vision_config: required object is missing")
    rope = t.get("rope_parameters") or t.get("rope_scaling") or d.get("rope_scaling") or {}
    if "mrope_section" not in rope:
        raise ConfigError(f"{file}: {tw}rope_scaling.mrope_section: required field is missing")
    theta = rope.get("rope_theta", t.get("rope_theta", d.get("rope_theta", 1_000_000.0)))
    for where, dd in ((tw, t), ("vision_config.", v)):
        act = dd.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{file}: {where}hidden_act: only 'silu' is implemented, got {act!r}")
    if d.get("tie_word_embeddings", t.get("tie_word_embeddings", False)):
        raise ConfigError(f"{file}: tie_word_embeddings: tied LM heads are not supported")
    text = TextConfig(
        vocab_size=_get(t, "vocab_size", file, tw),
        hidden_size=_get(t, "hidden_size", file, tw),
        num_layers=_get(t, "num_hidden_layers", file, tw),
        num_heads=_get(t, "num_attention_heads", file, tw),
        num_kv_heads=t.get("num_key_value_heads") or _get(t, "num_attention_heads", file, tw),
        intermediate_size=_get(t, "intermediate_size", file, tw),
        rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        max_position_embeddings=int(t.get("max_position_embeddings", 128000)),
    )
    vw = "vision_config."
    vision = QwenVisionConfig(
        depth=_get(v, "depth", file, vw),
        hidden_size=_get(v, "hidden_size", file, vw),
        num_heads=_get(v, "num_heads", file, vw),
        intermediate_size=_get(v, "intermediate_size", file, vw),
        out_hidden_size=_get(v, "out_hidden_size", file, vw),
        patch_size=int(v.get("patch_size", 14)),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        window_size=int(v.get("window_size", 112)),
        fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes", (7, 15, 23, 31))),
        in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
    )
    if vision.out_hidden_size != text.hidden_size:
        raise ConfigError(
            f"{file}: vision_config.out_hidden_size: {vision.out_hidden_size} != the text hidden_size {text.hidden_size}"
        )
    ids = {k: int(d.get(k, getattr(QwenVLConfig, k))) for k in ("image_token_id", "video_token_id")}
    ids.update({k: int(d.get(k, getattr(QwenVLConfig, k))) for k in ("vision_start_token_id", "vision_end_token_id")})
    try:
        return QwenVLConfig(vision=vision, text=text, mrope_section=tuple(rope["mrope_section"]), **ids, **run)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


def config_dict(config: QwenVLConfig, torch_dtype: str = "bfloat16") -> dict:
    """A Qwen2.5-VL ``config.json`` (the transformers-4.x layout, which 5.x reads too)."""
    t, v = config.text, config.vision
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "torch_dtype": torch_dtype,
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "intermediate_size": t.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "max_position_embeddings": t.max_position_embeddings,
        "rope_scaling": {"type": "mrope", "mrope_section": list(config.mrope_section)},
        "tie_word_embeddings": False,
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id,
        "vision_config": {
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "num_heads": v.num_heads,
            "intermediate_size": v.intermediate_size,
            "out_hidden_size": v.out_hidden_size,
            "hidden_act": "silu",
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "in_chans": v.in_channels,
        },
    }


def read_skywork_config(model_dir: str | os.PathLike, **run) -> QwenVLConfig:
    path = os.path.join(os.fspath(model_dir), "config.json")
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return config_from_dict(d, path, **run)


# --- loading ----------------------------------------------------------------------------------


def detect_naming(keys) -> str:
    """'v5' when any key is under ``model.visual.`` or ``model.language_model.``, else 'v4'."""
    return "v5" if any(k.startswith(NAMINGS["v5"]) for k in keys) else "v4"


def _sources(model_dir: str, value_head: str | None):
    """(backbone reader, value-head reader) and the value head's file name for messages."""
    main = SafetensorsDir(model_dir)
    vh_path = value_head or os.path.join(model_dir, VALUE_HEAD_FILE)
    if os.path.exists(vh_path) or value_head is not None:
        return main, SafetensorsFile(vh_path)
    if all(k in main.shapes for k in VALUE_HEAD_KEYS):
        return main, main
    raise CheckpointKeyError(
        f"{model_dir}: no {VALUE_HEAD_FILE} and the checkpoint has no {VALUE_HEAD_KEYS[0]} (the value head)"
    )


def _where(reader, key: str) -> str:
    if isinstance(reader, SafetensorsFile):
        return reader.path
    return os.path.join(reader.path, reader.file_of(key))


def check_released(main, vhead, entries) -> None:
    """Every problem at once: missing and unexpected keys, wrong shapes, non-float dtypes,
    each named with its file (the value head's own file when it is separate)."""
    expected = {e.key: e.shape for e in entries}
    groups = [(main, {k: s for k, s in expected.items() if vhead is main or k not in VALUE_HEAD_KEYS})]
    if vhead is not main:
        groups.append((vhead, {k: expected[k] for k in VALUE_HEAD_KEYS}))
    problems = []
    for reader, want in groups:
        missing = [k for k in want if k not in reader.shapes]
        extra = sorted(k for k in reader.shapes if k not in want)
        if missing:
            problems.append(f"{reader.path}: missing keys ({len(missing)}): " + ", ".join(missing[:20]))
        if extra:
            problems.append(f"{reader.path}: unexpected keys ({len(extra)}): " + ", ".join(extra[:20]))
        for k, shape in want.items():
            if k not in reader.shapes:
                continue
            if tuple(reader.shapes[k]) != tuple(shape):
                problems.append(
                    f"{_where(reader, k)}: {k}: shape {list(reader.shapes[k])}, the config expects {list(shape)}"
                )
            if reader.dtype(k) not in FLOAT_CODES:
                problems.append(f"{_where(reader, k)}: {k}: dtype {reader.dtype(k)}, expected one of {FLOAT_CODES}")
    if problems:
        raise CheckpointKeyError("the checkpoint does not match its config:\n  " + "\n  ".join(problems))


def load_skywork_vl(
    model_dir: str | os.PathLike, *, value_head: str | None = None, dtype=None, **run
) -> tuple[QwenVLConfig, dict]:
    """(config, reward-model parameters ``{"backbone", "value_head"}`` as numpy) from the
    released directory, one tensor at a time. ``value_head``: the value-head file (default
    ``<model_dir>/value_head.safetensors``); ``dtype`` casts every tensor (None: as stored);
    ``run``: how the model runs (``scan_layers``, ``attention_impl``, ``dtype`` of compute...)."""
    model_dir = os.fspath(model_dir)
    main, vhead = _sources(model_dir, value_head)
    config = read_skywork_config(model_dir, **run).replace(lm_head="lm_head.weight" in main.shapes)
    entries = key_entries(config, detect_naming(main.keys()))
    check_released(main, vhead, entries)
    counts: dict[tuple[str, ...], int] = {}
    for e in entries:
        if e.layer is not None:
            counts[e.path] = counts.get(e.path, 0) + 1
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for e in entries:
        x = e.transform.to_ours(np.asarray((vhead if e.key in VALUE_HEAD_KEYS else main).get(e.key)))
        if dtype is not None:
            x = x.astype(dtype)
        if e.layer is None:
            flat[e.path] = np.ascontiguousarray(x)
        else:
            if e.path not in flat:
                flat[e.path] = np.empty((counts[e.path],) + x.shape, x.dtype)
            flat[e.path][e.layer] = x
    return config, _unflatten(flat)


# --- export -----------------------------------------------------------------------------------


def released_tensors(params, config: QwenVLConfig, naming: str = "v4") -> Iterator[tuple[str, np.ndarray]]:
    """(released key, numpy tensor) for every parameter, one at a time, in checkpoint order."""
    flat = {tuple(k.key for k in kp): v for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for e in key_entries(config, naming):
        if e.path not in flat:
            raise CheckpointKeyError(f"parameter tree has no {'/'.join(e.path)} (for {e.key})")
        x = flat[e.path]
        x = x[e.layer] if e.layer is not None else x
        x = e.transform.to_released(np.asarray(jax.device_get(x)))
        if tuple(x.shape) != e.shape:
            raise CheckpointKeyError(f"{'/'.join(e.path)}: gives {e.key} {list(x.shape)}, expected {list(e.shape)}")
        yield e.key, np.ascontiguousarray(x)


def export_skywork_vl(
    params,
    config: QwenVLConfig,
    out_dir: str | os.PathLike,
    *,
    naming: str = "v4",
    config_json: dict | None = None,
    max_shard_bytes: int = 5 * 1000**3,
    overwrite: bool = False,
) -> list[str]:
    """Write the released layout: safetensors shards (+ index) of the backbone, config.json
    (``config_json`` or :func:`config_dict`) and ``value_head.safetensors``; published
    atomically like our converter's output. Tensors keep their dtype. Returns the shard names."""
    entries = [e for e in key_entries(config, naming) if e.key not in VALUE_HEAD_KEYS]
    flat = {tuple(k.key for k in kp): v for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    specs = [(e.key, e.shape, np.dtype(flat[e.path].dtype)) for e in entries if e.path in flat]
    tensors = released_tensors(params, config, naming)
    backbone = (x for k, x in tensors if k not in VALUE_HEAD_KEYS)
    tmp = tempfile.mkdtemp(prefix="value_head.")
    try:
        head = {
            VALUE_HEAD_KEYS[0]: np.ascontiguousarray(np.asarray(params["value_head"]["kernel"]).T),
            VALUE_HEAD_KEYS[1]: np.ascontiguousarray(np.asarray(params["value_head"]["bias"])),
        }
        vh = os.path.join(tmp, VALUE_HEAD_FILE)
        write_safetensors_file(vh, head)
        return write_safetensors_dir(
            specs,
            backbone,
            out_dir,
            config_json=config_json or config_dict(config, torch_dtype=str(specs[0][2])),
            max_shard_bytes=max_shard_bytes,
            overwrite=overwrite,
            extra_files={VALUE_HEAD_FILE: vh},
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
