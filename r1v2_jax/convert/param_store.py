"""Our parameter checkpoint: one tensorstore zarr3 array per parameter, plus metadata.

Layout of a checkpoint directory (local path or ``gs://bucket/path``)::

    r1v2_params.json        format, version, model config, dtype, every leaf's shape/dtype/chunks
    params/<tree path>/     one zarr3 array per parameter, in the scan layout
                            (stacked layers: leading axis = layer, chunked one layer per chunk)
    hf/                     the source checkpoint's config.json, tokenizer and code files

It is written by ``tools/convert_weights/hf_to_jax.py`` one released tensor at a time (a
stacked leaf is filled layer by layer, so memory never holds a whole stack), and restored by
:func:`load_params` directly onto any mesh: each device reads only the chunks of its own
shard. Chunks can be aligned to a target mesh's shards at conversion time.

The metadata file is written last and the directory is renamed into place only when
complete, so a folder without ``r1v2_params.json`` is never a checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from r1v2_jax.model.config import ModelConfig

META_FILE = "r1v2_params.json"
FORMAT = "r1v2-params"
VERSION = 1
# Default chunk budget for unstacked leaves (bytes): big embeddings are split along rows.
DEFAULT_CHUNK_BYTES = 256 * 1024**2


class CheckpointError(ValueError):
    """A parameter checkpoint is missing, incomplete or does not match the model."""


def _kvstore(path: str) -> dict:
    if path.startswith("gs://"):
        bucket, _, sub = path[5:].partition("/")
        return {"driver": "gcs", "bucket": bucket, "path": sub}
    return {"driver": "file", "path": os.path.abspath(path)}


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


def _read_text(path: str) -> str:
    if path.startswith("gs://"):
        import tensorstore as ts

        kv = ts.KvStore.open(_kvstore(path.rsplit("/", 1)[0] + "/")).result()
        r = kv.read(path.rsplit("/", 1)[1]).result()
        if r.state != "value":
            raise FileNotFoundError(path)
        return bytes(r.value).decode()
    with open(path, encoding="utf-8") as f:
        return f.read()


def leaf_name(path: tuple[str, ...]) -> str:
    return "/".join(path)


def default_chunks(shape: tuple[int, ...], dtype, stacked: bool, shard_shape: tuple[int, ...] | None = None,
                   max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[int]:
    """Chunk shape of one leaf: one layer per chunk for stacked leaves; the per-device shard
    shape when a target mesh is given; else rows split so a chunk stays under the budget."""
    chunk = list(shard_shape) if shard_shape is not None else list(shape)
    if stacked:
        chunk[0] = 1
    if shard_shape is None and len(shape) >= 1:
        itemsize = np.dtype(dtype).itemsize
        axis = 1 if stacked and len(shape) > 1 else 0
        while chunk[axis] > 1 and int(np.prod(chunk)) * itemsize > max_chunk_bytes and chunk[axis] % 2 == 0:
            chunk[axis] //= 2
    return [max(1, c) for c in chunk]


class ParamWriter:
    """Creates the zarr arrays of a checkpoint and writes leaves or single layers into them."""

    def __init__(self, root: str, leaves: dict[str, dict]):
        import tensorstore as ts

        self.root, self.leaves, self._arrays = root, leaves, {}
        for name, info in leaves.items():
            spec = {
                "driver": "zarr3",
                "kvstore": _kvstore(_join(root, "params", name)),
                "metadata": {"shape": list(info["shape"]), "data_type": info["dtype"],
                             "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(info["chunks"])}}},
                "create": True,
                "delete_existing": True,
            }
            self._arrays[name] = ts.open(spec).result()

    def write(self, name: str, value: np.ndarray, layer: int | None = None) -> None:
        arr = self._arrays[name]
        target = arr if layer is None else arr[layer]
        if tuple(target.shape) != tuple(value.shape):
            raise CheckpointError(f"{name}{'' if layer is None else f'[{layer}]'}: writing shape "
                                  f"{list(value.shape)} into {list(target.shape)}")
        target.write(np.asarray(value, dtype=self.leaves[name]["dtype"])).result()

    def finish(self, config: ModelConfig, extra: dict | None = None) -> None:
        meta = {"format": FORMAT, "version": VERSION, "model_config": config.to_config_dict().to_dict(),
                "leaves": self.leaves, **(extra or {})}
        path = _join(self.root, META_FILE)
        text = json.dumps(meta, indent=1)
        if path.startswith("gs://"):
            import tensorstore as ts

            kv = ts.KvStore.open(_kvstore(self.root + "/")).result()
            kv.write(META_FILE, text.encode()).result()
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())


def read_metadata(ckpt_dir: str) -> dict:
    path = _join(os.fspath(ckpt_dir), META_FILE)
    try:
        meta = json.loads(_read_text(path))
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir}: no {META_FILE}: not a complete r1v2 parameter checkpoint "
                              "(a conversion that did not finish leaves no loadable output)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} v{meta.get('version')!r}, "
                              f"expected {FORMAT!r} v{VERSION}")
    return meta


def checkpoint_config(ckpt_dir: str, **run_options) -> ModelConfig:
    """The ModelConfig stored in a checkpoint, with run options (dtype, scan_layers, ...) replaced."""
    d = dict(read_metadata(ckpt_dir)["model_config"])
    d.update(run_options)
    return ModelConfig.from_config_dict(d)


def open_leaves(ckpt_dir: str, meta: dict | None = None) -> dict[str, Any]:
    import tensorstore as ts

    meta = meta or read_metadata(ckpt_dir)
    out = {}
    for name in meta["leaves"]:
        spec = {"driver": "zarr3", "kvstore": _kvstore(_join(os.fspath(ckpt_dir), "params", name)), "open": True}
        try:
            out[name] = ts.open(spec).result()
        except Exception as e:
            raise CheckpointError(f"{ckpt_dir}: parameter array {name} cannot be opened: {e}") from None
    return out


def load_params(ckpt_dir: str, config: ModelConfig | None = None, *, mesh=None, rules=None,
                dtype: str | None = None) -> tuple[ModelConfig, Any]:
    """Restore parameters (and the config) from a checkpoint, optionally sharded on ``mesh``.

    ``config`` overrides the run options (it must describe the same architecture); by default
    the stored config is used with ``dtype`` as parameter/compute dtype. The scan or unrolled
    layout follows ``config.scan_layers``. With a mesh, every device reads only its shard.
    """
    from r1v2_jax.model.vlm import abstract_params, param_shardings
    from r1v2_jax.parallel.sharding import DEFAULT_RULES

    meta = read_metadata(ckpt_dir)
    stored = ModelConfig.from_config_dict(meta["model_config"])
    if config is None:
        config = stored if dtype is None else stored.replace(dtype=dtype, param_dtype=dtype)
    elif config.replace(dtype=stored.dtype, param_dtype=stored.param_dtype, scan_layers=stored.scan_layers,
                        remat_policy=stored.remat_policy, attention_impl=stored.attention_impl,
                        attention_chunk_size=stored.attention_chunk_size,
                        attention_interpret=stored.attention_interpret) != stored:
        raise CheckpointError(f"{ckpt_dir}: the given config's architecture differs from the stored one")
    arrays = open_leaves(ckpt_dir, meta)
    expected = abstract_params(config.replace(scan_layers=True), boxed=False)
    flat = {leaf_name(tuple(k.key for k in kp)): x for kp, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    problems = [f"missing {n}" for n in flat if n not in arrays]
    problems += [f"unexpected {n}" for n in arrays if n not in flat]
    problems += [f"{n}: stored {list(arrays[n].shape)}, model expects {list(flat[n].shape)}"
                 for n in flat if n in arrays and tuple(arrays[n].shape) != tuple(flat[n].shape)]
    if problems:
        raise CheckpointError(f"{ckpt_dir}: does not match the model: " + "; ".join(problems[:20]))
    want = jnp.dtype(config.param_dtype)
    shardings = None
    if mesh is not None:
        shardings = param_shardings(config, mesh, rules or DEFAULT_RULES)

    def reader(name: str, layer: int | None) -> Callable:
        arr = arrays[name] if layer is None else arrays[name][layer]
        return lambda idx=(): np.asarray(arr[idx].read().result()).astype(want)

    def build(path: tuple[str, ...], sharding):
        name, layer = leaf_name(path), None
        for i, p in enumerate(path):  # unrolled layout: .../layers/block_{i}/... -> stacked leaf [i]
            if p.startswith("block_") and path[i - 1] == "layers":
                name, layer = leaf_name(path[:i] + ("block",) + path[i + 1:]), int(p[6:])
        read = reader(name, layer)
        if sharding is None:
            return jnp.asarray(read())
        shape = arrays[name].shape[1:] if layer is not None else arrays[name].shape
        return jax.make_array_from_callback(tuple(shape), sharding, lambda idx: read(idx))

    target = abstract_params(config, boxed=False)
    if shardings is None:
        params = jax.tree_util.tree_map_with_path(lambda kp, _: build(tuple(k.key for k in kp), None), target)
    else:
        params = jax.tree_util.tree_map_with_path(lambda kp, _, s: build(tuple(k.key for k in kp), s), target,
                                                  shardings)
    return config, params
