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

Integrity (format version 2): the metadata holds a manifest, every array's files (``zarr.json``
and each chunk file) with their size and CRC-32, taken from the files as written. Opening a
checkpoint (:func:`open_leaves`, so :func:`load_params` and ``jax_to_hf``) lists every array's
files and refuses, naming the array and the file, a missing, extra, resized or (with
``verify="checksum"``, the default) changed file. Without this a chunk file lost in an
interrupted copy reads as zeros. ``verify="size"`` skips the checksum pass (one extra read of
every file; on several processes each verifies its share of the arrays, so every process
must open the checkpoint, as a multi-host restore does); version-1 checkpoints (no manifest)
load with a warning. The metadata also records how many non-finite values the converter met
in each array (``nonfinite``); opening warns when any did.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from r1v2_jax.model.config import ModelConfig
from r1v2_jax.model.vlm import abstract_params, param_shardings
from r1v2_jax.parallel.multihost import allgather_json
from r1v2_jax.parallel.sharding import DEFAULT_RULES

META_FILE = "r1v2_params.json"
FORMAT = "r1v2-params"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no manifest (loads unverified, with a warning)
VERIFY_MODES = ("checksum", "size")

log = logging.getLogger("r1v2_jax.convert")
# Default chunk budget for unstacked leaves (bytes): big embeddings are split along rows.
DEFAULT_CHUNK_BYTES = 256 * 1024**2


class CheckpointError(ValueError):
    """A parameter checkpoint is missing, incomplete or does not match the model."""


def _kvstore(path: str) -> dict:
    if path.startswith("gs://"):
        bucket, _, sub = path[5:].partition("/")
        return {"driver": "gcs", "bucket": bucket, "path": sub}
    return {"driver": "file", "path": os.path.abspath(path)}


def _kv_dir(path: str):
    """A tensorstore KvStore whose keys are the files under the directory (or prefix) ``path``."""

    spec = _kvstore(path)
    spec["path"] = spec["path"].rstrip("/") + "/"
    return ts.KvStore.open(spec).result()


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


def _read_text(path: str) -> str:
    if path.startswith("gs://"):
        kv = ts.KvStore.open(_kvstore(path.rsplit("/", 1)[0] + "/")).result()
        r = kv.read(path.rsplit("/", 1)[1]).result()
        if r.state != "value":
            raise FileNotFoundError(path)
        return bytes(r.value).decode()
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_remote_file(path: str, data: bytes) -> None:
    """Write one object of a bucket (``gs://bucket/dir/name``)."""
    parent, name = path.rsplit("/", 1)
    _kv_dir(parent).write(name, data).result()


def remote_output_dir(out_dir: str, overwrite: bool) -> str:
    """Prepare a bucket prefix to write a checkpoint into in place (a bucket has no rename):
    refuse one holding objects unless ``overwrite``; with it, delete the metadata file first
    (from then on the prefix is not a checkpoint) and then every other object."""

    kv = _kv_dir(out_dir)
    keys = kv.list().result()
    if keys and not overwrite:
        raise FileExistsError(
            f"{out_dir}: holds {len(keys)} object(s) (pass overwrite=True / --overwrite to replace them)"
        )
    if keys:
        kv.delete_range(ts.KvStore.KeyRange(META_FILE, META_FILE + "\0")).result()
        kv.delete_range(ts.KvStore.KeyRange()).result()
    return out_dir.rstrip("/")


def remote_side_files(ckpt_dir: str, local_dir: str) -> str:
    """Copy the ``hf/`` side files of a checkpoint in a bucket to ``local_dir``; returns it."""
    kv = _kv_dir(_join(ckpt_dir, "hf"))
    for key in kv.list().result():
        name = key.decode()
        if "/" not in name:
            with open(os.path.join(local_dir, name), "wb") as f:
                f.write(bytes(kv.read(key).result().value))
    return local_dir


def is_checkpoint(path: str) -> bool:
    """Whether ``path`` (local or ``gs://``) holds our checkpoint's metadata file."""
    try:
        _read_text(_join(os.fspath(path), META_FILE))
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def leaf_name(path: tuple[str, ...]) -> str:
    return "/".join(path)


def default_chunks(
    shape: tuple[int, ...],
    dtype,
    stacked: bool,
    shard_shape: tuple[int, ...] | None = None,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> list[int]:
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

        self.root, self.leaves, self._arrays = root, leaves, {}
        for name, info in leaves.items():
            spec = {
                "driver": "zarr3",
                "kvstore": _kvstore(_join(root, "params", name)),
                "metadata": {
                    "shape": list(info["shape"]),
                    "data_type": info["dtype"],
                    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(info["chunks"])}},
                },
                "create": True,
                "delete_existing": True,
                # every chunk gets a file, zeros too, so the manifest can list them all
                "store_data_equal_to_fill_value": True,
            }
            self._arrays[name] = ts.open(spec).result()

    def write(self, name: str, value: np.ndarray, layer: int | None = None) -> None:
        arr = self._arrays[name]
        target = arr if layer is None else arr[layer]
        if tuple(target.shape) != tuple(value.shape):
            raise CheckpointError(
                f"{name}{'' if layer is None else f'[{layer}]'}: writing shape "
                f"{list(value.shape)} into {list(target.shape)}"
            )
        target.write(np.asarray(value, dtype=self.leaves[name]["dtype"])).result()

    def finish(self, config: ModelConfig, extra: dict | None = None) -> None:
        """Write the metadata (last): the manifest of every array's files, read back as written."""
        manifest = {name: array_files(self.root, name) for name in self.leaves}
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "model_config": config.to_config_dict().to_dict(),
            "leaves": self.leaves,
            "manifest": manifest,
            **(extra or {}),
        }
        path = _join(self.root, META_FILE)
        text = json.dumps(meta, indent=1)
        if path.startswith("gs://"):
            kv = ts.KvStore.open(_kvstore(self.root + "/")).result()
            kv.write(META_FILE, text.encode()).result()
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())


def array_files(root: str, name: str, checksums: bool = True) -> dict[str, list[int]]:
    """``{file key: [size, crc32]}`` of every file of one parameter array (crc32 -1 unless
    ``checksums``), read one file at a time."""
    base = _join(root, "params", name)
    kv = _kv_dir(base)
    out = {}
    for key in sorted(k.decode() for k in kv.list().result()):
        if not checksums and not base.startswith("gs://"):  # sizes only: no read
            out[key] = [os.path.getsize(os.path.join(os.path.abspath(base), key)), -1]
            continue
        value = bytes(kv.read(key).result().value)
        out[key] = [len(value), zlib.crc32(value) if checksums else -1]
    return out


def verify_leaf(ckpt_dir: str, name: str, expected: dict[str, list[int]], verify: str = "checksum") -> None:
    """Check one array's files against its manifest entry; a CheckpointError names the array."""
    found = array_files(ckpt_dir, name, checksums=verify == "checksum")
    where = f"{ckpt_dir}: parameter array {name}"
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(
            f"{where}: file(s) {missing[:5]} of its {len(expected)} are missing (an interrupted "
            "copy?); refusing to load it (missing chunks would read as zeros)"
        )
    extra = sorted(set(found) - set(expected))
    if extra:
        raise CheckpointError(f"{where}: unexpected file(s) {extra[:5]} not in the manifest")
    for key, (size, crc) in expected.items():
        got_size, got_crc = found[key]
        if got_size != size:
            raise CheckpointError(
                f"{where}: file {key} has {got_size} bytes, the manifest says {size} (truncated or replaced)"
            )
        if verify == "checksum" and got_crc != crc:
            raise CheckpointError(
                f"{where}: file {key} fails its checksum (crc32 {got_crc:#010x}, manifest "
                f"{crc:#010x}): the data changed after it was written"
            )


def _verify_all(ckpt_dir: str, meta: dict, verify: str) -> None:
    """Verify every array; on several processes each checks its share of the arrays and the
    first error found anywhere is raised on all (so every process must call this, as a
    multi-host restore does), instead of every host reading the whole checkpoint twice."""
    names = sorted(meta["leaves"])
    p, n = jax.process_index(), jax.process_count()
    error = None
    try:
        for name in names[p::n]:
            verify_leaf(ckpt_dir, name, meta["manifest"][name], verify)
    except CheckpointError as e:
        if n == 1:
            raise
        error = str(e)
    if n > 1:
        errors = [x for x in allgather_json(error) if x]
        if errors:
            raise CheckpointError(errors[0])


def read_metadata(ckpt_dir: str) -> dict:
    path = _join(os.fspath(ckpt_dir), META_FILE)
    try:
        meta = json.loads(_read_text(path))
    except FileNotFoundError:
        raise CheckpointError(
            f"{ckpt_dir}: no {META_FILE}: not a complete r1v2 parameter checkpoint "
            "(a conversion that did not finish leaves no loadable output)"
        ) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: format {meta.get('format')!r} v{meta.get('version')!r}, expected {FORMAT!r} v{VERSION}"
        )
    if meta["version"] >= 2 and set(meta.get("manifest", {})) != set(meta.get("leaves", {})):
        raise CheckpointError(f"{path}: the manifest does not list every parameter array")
    return meta


def checkpoint_config(ckpt_dir: str, **run_options) -> ModelConfig:
    """The ModelConfig stored in a checkpoint, with run options (dtype, scan_layers, ...) replaced."""
    d = dict(read_metadata(ckpt_dir)["model_config"])
    d.update(run_options)
    return ModelConfig.from_config_dict(d)


def open_leaves(ckpt_dir: str, meta: dict | None = None, verify: str = "checksum") -> dict[str, Any]:
    """Open every parameter array, after checking its files against the manifest (``verify``:
    ``checksum`` or ``size``, see the module docstring)."""

    if verify not in VERIFY_MODES:
        raise ValueError(f"verify: expected one of {VERIFY_MODES}, got {verify!r}")
    meta = meta or read_metadata(ckpt_dir)
    if "manifest" not in meta:
        log.warning("%s: a version-1 checkpoint without a manifest: its files cannot be verified", ckpt_dir)
    bad = {n: c for n, c in meta.get("nonfinite", {}).items() if c}
    if bad:
        log.warning(
            "%s: the converter found non-finite values in %d array(s): %s",
            ckpt_dir,
            len(bad),
            ", ".join(f"{n} ({c})" for n, c in sorted(bad.items())[:10]),
        )
    if "manifest" in meta:
        _verify_all(os.fspath(ckpt_dir), meta, verify)
    out = {}
    for name in meta["leaves"]:
        spec = {"driver": "zarr3", "kvstore": _kvstore(_join(os.fspath(ckpt_dir), "params", name)), "open": True}
        try:
            out[name] = ts.open(spec).result()
        except Exception as e:
            raise CheckpointError(f"{ckpt_dir}: parameter array {name} cannot be opened: {e}") from None
    return out


def load_params(
    ckpt_dir: str,
    config: ModelConfig | None = None,
    *,
    mesh=None,
    rules=None,
    dtype: str | None = None,
    verify: str = "checksum",
) -> tuple[ModelConfig, Any]:
    """Restore parameters (and the config) from a checkpoint, optionally sharded on ``mesh``.

    ``config`` overrides the run options (it must describe the same architecture); by default
    the stored config is used with ``dtype`` as parameter/compute dtype. The scan or unrolled
    layout follows ``config.scan_layers``. With a mesh, every device reads only its shard.
    ``verify``: how the files are checked against the manifest first (:func:`open_leaves`).
    """

    meta = read_metadata(ckpt_dir)
    stored = ModelConfig.from_config_dict(meta["model_config"])
    if config is None:
        config = stored if dtype is None else stored.replace(dtype=dtype, param_dtype=dtype)
    elif (
        config.replace(
            dtype=stored.dtype,
            param_dtype=stored.param_dtype,
            scan_layers=stored.scan_layers,
            remat_policy=stored.remat_policy,
            attention_impl=stored.attention_impl,
            attention_chunk_size=stored.attention_chunk_size,
            attention_interpret=stored.attention_interpret,
        )
        != stored
    ):
        raise CheckpointError(f"{ckpt_dir}: the given config's architecture differs from the stored one")
    arrays = open_leaves(ckpt_dir, meta, verify)
    expected = abstract_params(config.replace(scan_layers=True), boxed=False)
    flat = {leaf_name(tuple(k.key for k in kp)): x for kp, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    problems = [f"missing {n}" for n in flat if n not in arrays]
    problems += [f"unexpected {n}" for n in arrays if n not in flat]
    problems += [
        f"{n}: stored {list(arrays[n].shape)}, model expects {list(flat[n].shape)}"
        for n in flat
        if n in arrays and tuple(arrays[n].shape) != tuple(flat[n].shape)
    ]
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
                name, layer = leaf_name(path[:i] + ("block",) + path[i + 1 :]), int(p[6:])
        read = reader(name, layer)
        if sharding is None:
            return jnp.asarray(read())
        shape = arrays[name].shape[1:] if layer is not None else arrays[name].shape
        return jax.make_array_from_callback(tuple(shape), sharding, lambda idx: read(idx))

    target = abstract_params(config, boxed=False)
    if shardings is None:
        params = jax.tree_util.tree_map_with_path(lambda kp, _: build(tuple(k.key for k in kp), None), target)
    else:
        params = jax.tree_util.tree_map_with_path(
            lambda kp, _, s: build(tuple(k.key for k in kp), s), target, shardings
        )
    return config, params
