"""The key map between the released checkpoint (PyTorch names) and our parameter tree.

Declarative: each rule names a released key (``{i}`` for a layer index), a path in our tree,
and a reversible transform. The list of concrete entries is derived from our abstract
parameter tree (``jax.eval_shape`` of init), so optional parameters (qkv bias, LayerNorm
biases) are mapped exactly when the model has them, and a parameter no rule covers is an
error at once. Stacked (scanned) layers live at ``.../layers/block/...`` with a leading
layer axis; unrolled ones at ``.../layers/block_{i}/...``.

    released key                                    ours (scan layout)
    vision_model.embeddings.patch_embedding.weight  vision_model/embeddings/patch_kernel   [O,I,kh,kw] -> [kh,kw,I,O]
    vision_model.encoder.layers.{i}.attn.qkv.weight vision_model/layers/block/attn/qkv/kernel[i]   [out,in] -> [in,out]
    mlp1.1.weight                                   mlp1/fc1/kernel                          [out,in] -> [in,out]
    language_model.model.layers.{i}.mlp.up_proj.weight  language_model/layers/block/mlp/up_proj/kernel[i]
    language_model.lm_head.weight                   language_model/lm_head/kernel            [V,H] -> [H,V]
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterable, Iterator, Mapping

import flax.linen as nn
import jax
import numpy as np

from r1v2_jax.model.config import ModelConfig
from r1v2_jax.model.vlm import abstract_params  # late import: model imports nothing from here


class CheckpointKeyError(KeyError):
    """A released checkpoint's keys or shapes do not match the model."""

    def __str__(self):  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class Transform:
    """A reversible array transform between the released layout and ours."""

    name: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_released: Callable[[np.ndarray], np.ndarray]
    released_shape: Callable[[tuple], tuple]


IDENTITY = Transform("identity", lambda x: x, lambda x: x, lambda s: tuple(s))
# torch.nn.Linear.weight [out, in] <-> our kernel [in, out]
LINEAR = Transform("linear", lambda x: x.T, lambda x: x.T, lambda s: tuple(s[::-1]))
# torch.nn.Conv2d.weight [O, I, kh, kw] <-> our patch kernel [kh, kw, I, O]
CONV = Transform(
    "conv", lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1), lambda s: (s[3], s[2], s[0], s[1])
)

# (released key, our path, transform). Paths are relative to the tower; per-layer keys hold {i}.
_VISION_TOP = [
    ("vision_model.embeddings.class_embedding", "vision_model/embeddings/class_embedding", IDENTITY),
    ("vision_model.embeddings.patch_embedding.weight", "vision_model/embeddings/patch_kernel", CONV),
    ("vision_model.embeddings.patch_embedding.bias", "vision_model/embeddings/patch_bias", IDENTITY),
    ("vision_model.embeddings.position_embedding", "vision_model/embeddings/position_embedding", IDENTITY),
]
_VISION_LAYER = [  # under vision_model.encoder.layers.{i}. <-> vision_model/layers/block
    ("attn.qkv.weight", "attn/qkv/kernel", LINEAR),
    ("attn.qkv.bias", "attn/qkv/bias", IDENTITY),
    ("attn.q_norm.weight", "attn/q_norm/scale", IDENTITY),
    ("attn.q_norm.bias", "attn/q_norm/bias", IDENTITY),
    ("attn.k_norm.weight", "attn/k_norm/scale", IDENTITY),
    ("attn.k_norm.bias", "attn/k_norm/bias", IDENTITY),
    ("attn.proj.weight", "attn/proj/kernel", LINEAR),
    ("attn.proj.bias", "attn/proj/bias", IDENTITY),
    ("mlp.fc1.weight", "mlp/fc1/kernel", LINEAR),
    ("mlp.fc1.bias", "mlp/fc1/bias", IDENTITY),
    ("mlp.fc2.weight", "mlp/fc2/kernel", LINEAR),
    ("mlp.fc2.bias", "mlp/fc2/bias", IDENTITY),
    ("norm1.weight", "norm1/scale", IDENTITY),
    ("norm1.bias", "norm1/bias", IDENTITY),
    ("norm2.weight", "norm2/scale", IDENTITY),
    ("norm2.bias", "norm2/bias", IDENTITY),
    ("ls1", "ls1", IDENTITY),
    ("ls2", "ls2", IDENTITY),
]
_ADAPTER = [
    ("mlp1.0.weight", "mlp1/norm/scale", IDENTITY),
    ("mlp1.0.bias", "mlp1/norm/bias", IDENTITY),
    ("mlp1.1.weight", "mlp1/fc1/kernel", LINEAR),
    ("mlp1.1.bias", "mlp1/fc1/bias", IDENTITY),
    ("mlp1.3.weight", "mlp1/fc2/kernel", LINEAR),
    ("mlp1.3.bias", "mlp1/fc2/bias", IDENTITY),
]
_TEXT_TOP = [
    ("language_model.model.embed_tokens.weight", "language_model/embed_tokens/embedding", IDENTITY),
    ("language_model.model.norm.weight", "language_model/norm/scale", IDENTITY),
    ("language_model.lm_head.weight", "language_model/lm_head/kernel", LINEAR),
]
# One Qwen2 decoder layer's rules; the Skywork-VL-Reward converter (convert/skywork_vl.py) uses them too
QWEN2_LAYER = [  # under language_model.model.layers.{i}. <-> language_model/layers/block
    ("self_attn.q_proj.weight", "self_attn/q_proj/kernel", LINEAR),
    ("self_attn.q_proj.bias", "self_attn/q_proj/bias", IDENTITY),
    ("self_attn.k_proj.weight", "self_attn/k_proj/kernel", LINEAR),
    ("self_attn.k_proj.bias", "self_attn/k_proj/bias", IDENTITY),
    ("self_attn.v_proj.weight", "self_attn/v_proj/kernel", LINEAR),
    ("self_attn.v_proj.bias", "self_attn/v_proj/bias", IDENTITY),
    ("self_attn.o_proj.weight", "self_attn/o_proj/kernel", LINEAR),
    ("mlp.gate_proj.weight", "mlp/gate_proj/kernel", LINEAR),
    ("mlp.up_proj.weight", "mlp/up_proj/kernel", LINEAR),
    ("mlp.down_proj.weight", "mlp/down_proj/kernel", LINEAR),
    ("input_layernorm.weight", "input_layernorm/scale", IDENTITY),
    ("post_attention_layernorm.weight", "post_attention_layernorm/scale", IDENTITY),
]
_TOWERS = [  # (released layer prefix, our stack path, per-layer rules, config field with the layer count)
    ("vision_model.encoder.layers.{i}.", "vision_model/layers", _VISION_LAYER, "vision"),
    ("language_model.model.layers.{i}.", "language_model/layers", QWEN2_LAYER, "text"),
]


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    """One released tensor and where it lives in our tree.

    ``path`` is the leaf path in our tree; ``layer`` is the index along the stacked layer axis
    (scan layout) or None. ``shape`` is the released tensor's shape.
    """

    key: str
    path: tuple[str, ...]
    layer: int | None
    transform: Transform
    shape: tuple[int, ...]


def _flat_paths(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[tuple(k.key for k in kp)] = tuple(leaf.shape)
    return out


@functools.lru_cache(maxsize=32)
def key_entries(config: ModelConfig) -> tuple[KeyEntry, ...]:
    """Every released tensor of a model with this config, in released-checkpoint order."""

    ours = _flat_paths(abstract_params(config, boxed=False))
    covered: set[tuple[str, ...]] = set()
    entries: list[KeyEntry] = []

    def add(key, path, layer, tr, our_shape):
        entries.append(KeyEntry(key, path, layer, tr, tr.released_shape(our_shape)))
        covered.add(path)

    for key, path, tr in _VISION_TOP:
        p = tuple(path.split("/"))
        if p in ours:
            add(key, p, None, tr, ours[p])
    towers = {t[3]: t for t in _TOWERS}

    def tower(which):
        prefix, stack, rules, _ = towers[which]
        n = getattr(config, which).num_layers
        for i in range(n):
            for key, path, tr in rules:
                if config.scan_layers:
                    p = tuple(f"{stack}/block/{path}".split("/"))
                    if p in ours:
                        add(prefix.format(i=i) + key, p, i, tr, ours[p][1:])
                else:
                    p = tuple(f"{stack}/block_{i}/{path}".split("/"))
                    if p in ours:
                        add(prefix.format(i=i) + key, p, None, tr, ours[p])

    tower("vision")
    for key, path, tr in _ADAPTER:
        p = tuple(path.split("/"))
        if p in ours:
            add(key, p, None, tr, ours[p])
    for key, path, tr in _TEXT_TOP[:1]:
        add(key, tuple(path.split("/")), None, tr, ours[tuple(path.split("/"))])
    tower("text")
    for key, path, tr in _TEXT_TOP[1:]:
        add(key, tuple(path.split("/")), None, tr, ours[tuple(path.split("/"))])
    missing = sorted("/".join(p) for p in set(ours) - covered)
    if missing:
        raise AssertionError(f"key map: parameters with no released key: {missing}")
    return tuple(entries)


def check_keys(available: Mapping[str, tuple[int, ...]], config: ModelConfig, source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointKeyError` naming every missing key, extra key and wrong shape.

    ``available`` maps released keys to their shapes (e.g. from a safetensors header).
    """
    entries = key_entries(config)
    expected = {e.key: e.shape for e in entries}
    problems = []
    missing = [k for k in expected if k not in available]
    extra = sorted(k for k in available if k not in expected)
    if missing:
        problems.append(
            f"missing keys ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
        )
    if extra:
        problems.append(
            f"unexpected keys ({len(extra)}): " + ", ".join(extra[:20]) + (" ..." if len(extra) > 20 else "")
        )
    for k, shape in expected.items():
        if k in available and tuple(available[k]) != tuple(shape):
            problems.append(f"wrong shape for {k}: checkpoint has {list(available[k])}, model expects {list(shape)}")
    if problems:
        raise CheckpointKeyError(f"{source} does not match the model config:\n  " + "\n  ".join(problems))


def released_to_params(
    get: Callable[[str], np.ndarray],
    available: Mapping[str, tuple[int, ...]],
    config: ModelConfig,
    dtype=None,
    source: str = "checkpoint",
) -> dict:
    """Build our (unboxed, numpy) parameter tree from released tensors.

    ``get(key)`` returns one released tensor; it is called once per key, so a lazy reader
    keeps at most one released tensor plus the output in memory. ``dtype`` casts every
    parameter (None keeps the stored dtype).
    """
    check_keys(available, config, source)
    entries = key_entries(config)
    counts: dict[tuple[str, ...], int] = {}
    for e in entries:
        if e.layer is not None:
            counts[e.path] = counts.get(e.path, 0) + 1
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for e in entries:
        x = e.transform.to_ours(np.asarray(get(e.key)))
        if dtype is not None:
            x = x.astype(dtype)
        if e.layer is None:
            flat[e.path] = np.ascontiguousarray(x)
        else:
            if e.path not in flat:
                flat[e.path] = np.empty((counts[e.path],) + x.shape, x.dtype)
            flat[e.path][e.layer] = x
    return _unflatten(flat)


def params_to_released(params, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (released key, numpy tensor) for every parameter, one at a time, in checkpoint order."""
    flat = {tuple(k.key for k in kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    for e in key_entries(config):
        if e.path not in flat:
            raise CheckpointKeyError(f"parameter tree has no {'/'.join(e.path)} (for {e.key})")
        x = flat[e.path]
        x = x[e.layer] if e.layer is not None else x
        x = e.transform.to_released(np.asarray(jax.device_get(x)))
        if tuple(x.shape) != e.shape:
            raise CheckpointKeyError(
                f"{'/'.join(e.path)}: shape {list(x.shape)} gives {e.key} {list(x.shape)}, expected {list(e.shape)}"
            )
        yield e.key, np.ascontiguousarray(x)


def _unflatten(flat: Mapping[tuple[str, ...], np.ndarray]) -> dict:
    out: dict = {}
    for path, x in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = x
    return out


def stack_layout(params, config: ModelConfig, scan: bool) -> dict:
    """Convert a parameter tree between the scan layout and the unrolled layout."""
    params = nn.unbox(params)
    src_cfg = config.replace(scan_layers=not scan)
    dst_cfg = config.replace(scan_layers=scan)
    released = dict(params_to_released(params, src_cfg))
    return released_to_params(released.__getitem__, {k: v.shape for k, v in released.items()}, dst_cfg)


def iter_keys(config: ModelConfig) -> Iterable[str]:
    return (e.key for e in key_entries(config))
