"""Streaming weight conversion between the released HF checkpoint and our parameter checkpoint.

* :func:`hf_to_jax`: released safetensors (one file or shards) -> :mod:`r1v2_jax.convert.param_store`.
* :func:`jax_to_hf`: our checkpoint -> released format (``released``) or the native
  transformers ``InternVLForConditionalGeneration`` format (``transformers``).

Both read and write one tensor at a time (stacked layers one layer at a time), so peak memory
is a few of the largest tensors, not the model. Both check every key and shape before
writing anything, assemble the output in a temporary folder beside ``out_dir`` and move it
into place only when complete (atomically, also over an old copy:
:mod:`r1v2_jax.convert.safetensors_io`), and refuse a non-empty ``out_dir`` unless ``overwrite``.
Pickle files are never loaded. Non-finite values (NaN, inf) in the weights are counted per
tensor and reported (``strict_finite=True``: an error, nothing published). The command-line
wrappers are ``tools/convert_weights/``.

Our checkpoint may live in a bucket (``gs://``) on either side. A bucket has no rename: the
checkpoint is written in place, its metadata file last (the commit marker), and with
``overwrite`` the old objects are deleted first, so a killed overwrite of a ``gs://`` output
leaves no loadable checkpoint there (never a mixed one).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from r1v2_jax.convert.hf_config import read_config
from r1v2_jax.convert.keymap import check_keys, key_entries
from r1v2_jax.convert.param_store import (
    META_FILE,
    CheckpointError,
    ParamWriter,
    default_chunks,
    leaf_name,
    open_leaves,
    read_metadata,
    remote_output_dir,
    remote_side_files,
    write_remote_file,
)
from r1v2_jax.convert.publish import OutputError, check_output_dir, fresh_output_dir, publish_dir
from r1v2_jax.convert.safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsDir, write_safetensors_dir
from r1v2_jax.convert.transformers_format import native_config_dict, native_parts, released_config_dict
from r1v2_jax.model.config import ModelConfig
from r1v2_jax.model.vlm import abstract_params
from r1v2_jax.parallel.sharding import DEFAULT_RULES, logical_to_pspec

# Files of an HF directory that travel with the weights (never weights, never pickles).
_SIDE_FILES = (".json", ".py", ".txt", ".model", ".tiktoken", ".md", ".jinja")
log = logging.getLogger("r1v2_jax.convert")

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)


def _side_files(src: str) -> list[str]:
    skip = {INDEX_FILE, SINGLE_FILE}
    return sorted(
        f for f in os.listdir(src) if f.endswith(_SIDE_FILES) and f not in skip and os.path.isfile(os.path.join(src, f))
    )


def _progress(total_bytes: int, desc: str, quiet: bool):
    if quiet:
        return None
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, file=sys.stderr, leave=False)


def count_nonfinite(x: np.ndarray) -> int:
    """How many NaN / inf values a float array holds (0 for other dtypes)."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return 0
    return int(x.size - np.count_nonzero(np.isfinite(x)))


def _report_nonfinite(counts: dict[str, int], where: str, strict: bool) -> None:
    bad = {k: v for k, v in counts.items() if v}
    if not bad:
        return
    listing = ", ".join(f"{k} ({v})" for k, v in list(bad.items())[:10]) + (" ..." if len(bad) > 10 else "")
    msg = f"{where}: {sum(bad.values())} non-finite value(s) in {len(bad)} tensor(s): {listing}"
    if strict:
        raise CheckpointError(msg + " (strict_finite: nothing was published)")
    log.warning("%s", msg)


def hf_to_jax(
    hf_dir: str,
    out_dir: str,
    *,
    dtype: str | None = None,
    mesh_shape: tuple[int, int, int] | None = None,
    overwrite: bool = False,
    strict: bool = True,
    image_token_id: int | None = None,
    quiet: bool = True,
    strict_finite: bool = False,
    report: dict | None = None,
) -> ModelConfig:
    """Convert a released-format directory to our parameter checkpoint at ``out_dir``.

    ``dtype``: target parameter dtype (None keeps the checkpoint's, which must be uniform).
    ``mesh_shape``: (data, fsdp, tensor); chunks are aligned with each device's shard on such
    a mesh so a sharded restore reads whole chunks (no devices are needed to convert).
    ``strict_finite``: a non-finite weight is an error (default: counted, warned about and
    recorded in the metadata). ``report``: a dict that receives ``nonfinite`` (tensor -> count).
    """
    # Longer than 60 lines: one streaming pass (check every key, then write tensor by tensor
    # into a temporary folder, then publish) whose cleanup must wrap all of it in one try.

    remote = out_dir.startswith("gs://")
    if not remote:
        check_output_dir(out_dir, overwrite)  # before any work
    store = SafetensorsDir(hf_dir)
    if dtype is None:
        stored = {store.dtype(k) for k in store.keys()}
        names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
        if len(stored) != 1 or next(iter(stored)) not in names:
            raise ValueError(f"{hf_dir}: tensors have dtypes {sorted(stored)}; pass dtype= to choose one")
        dtype = names[next(iter(stored))]
    config = read_config(
        hf_dir, strict=strict, image_token_id=image_token_id, dtype=dtype, param_dtype=dtype, scan_layers=True
    )
    check_keys(store.shapes, config, hf_dir)  # every key and shape, before anything is written
    entries = key_entries(config)
    leaves = _plan_leaves(config, dtype, mesh_shape)
    if remote:
        tmp = remote_output_dir(out_dir, overwrite)
    else:
        out_dir, tmp = fresh_output_dir(out_dir, overwrite)
    try:
        writer = ParamWriter(tmp, leaves)
        total = sum(int(np.prod(e.shape)) * jnp.dtype(dtype).itemsize for e in entries)
        bar = _progress(total, "hf_to_jax", quiet)
        nonfinite = dict.fromkeys(leaves, 0)
        for e in entries:
            x = e.transform.to_ours(store.get(e.key))
            nonfinite[leaf_name(e.path)] += count_nonfinite(x)
            writer.write(leaf_name(e.path), x, e.layer)
            if bar is not None:
                bar.update(x.size * jnp.dtype(dtype).itemsize)
            del x
        if bar is not None:
            bar.close()
        if report is not None:
            report["nonfinite"] = {k: v for k, v in nonfinite.items() if v}
        _report_nonfinite(nonfinite, hf_dir, strict_finite)
        if remote:
            for f in _side_files(hf_dir):
                with open(os.path.join(hf_dir, f), "rb") as fh:
                    write_remote_file(f"{out_dir.rstrip('/')}/hf/{f}", fh.read())
        else:
            os.makedirs(os.path.join(tmp, "hf"))
            for f in _side_files(hf_dir):
                shutil.copyfile(os.path.join(hf_dir, f), os.path.join(tmp, "hf", f))
        writer.finish(
            config, {"source": os.path.abspath(hf_dir), "mesh_shape": list(mesh_shape or ()), "nonfinite": nonfinite}
        )
        if not remote:
            publish_dir(tmp, out_dir)
    except OSError as e:
        if not remote:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(
            f"{out_dir}: writing the checkpoint failed ({e.strerror or e}); nothing was published "
            "and an existing copy is untouched"
        ) from None
    except BaseException:
        if not remote:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return config


def _plan_leaves(config: ModelConfig, dtype: str, mesh_shape) -> dict[str, dict]:
    """Shape, dtype and chunk shape of every leaf (scan layout)."""

    boxed = abstract_params(config, boxed=True)
    out = {}
    for kp, x in jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))[
        0
    ]:
        path = tuple(k.key for k in kp)
        shape = tuple(x.value.shape)
        stacked = "block" in path
        shard = None
        if mesh_shape is not None:
            sizes = dict(zip(("data", "fsdp", "tensor"), mesh_shape))
            spec = logical_to_pspec(x.names, DEFAULT_RULES, shape, _FakeMesh(sizes))
            shard = []
            for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
                axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
                shard.append(dim // int(np.prod([sizes[a] for a in axes])) if axes else dim)
        out[leaf_name(path)] = {
            "shape": list(shape),
            "dtype": dtype,
            "chunks": default_chunks(shape, jnp.dtype(dtype), stacked, shard),
        }
    return out


class _FakeMesh:
    """Just the axis sizes, for planning shards without devices."""

    def __init__(self, sizes):
        self.shape = sizes


def jax_to_hf(
    ckpt_dir: str,
    out_dir: str,
    *,
    fmt: str = "released",
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 1000**3,
    overwrite: bool = False,
    quiet: bool = True,
    strict_finite: bool = False,
    report: dict | None = None,
) -> list[str]:
    """Export our checkpoint as ``released`` (InternVL-Chat keys, the source's config and code
    files) or ``transformers`` (native InternVLForConditionalGeneration). Returns shard names.

    The checkpoint's files are verified against its manifest first (a missing or changed chunk
    file is an error naming the array). Non-finite values are counted per exported tensor
    (``strict_finite``: an error, nothing published; ``report`` receives ``nonfinite``)."""
    # Longer than 60 lines: verify, plan the shards, stream every tensor through the key map
    # and publish, with the cleanup of a failed export wrapping all of it in one try.

    if fmt not in ("released", "transformers"):
        raise ValueError(f"jax_to_hf: format must be 'released' or 'transformers', got {fmt!r}")
    if "://" in out_dir:
        raise ValueError(
            f"jax_to_hf: {out_dir}: the HF formats are written to a local folder (copy it to a bucket afterwards)"
        )
    check_output_dir(out_dir, overwrite)  # before any work
    meta = read_metadata(ckpt_dir)
    config = ModelConfig.from_config_dict(meta["model_config"]).replace(scan_layers=True)
    out_dtype = jnp.dtype(dtype or config.param_dtype)
    arrays = open_leaves(ckpt_dir, meta)
    entries = key_entries(config)
    for e in entries:  # the stored arrays must give exactly the released tensors
        shape = tuple(arrays[leaf_name(e.path)].shape)
        ours = shape[1:] if e.layer is not None else shape
        if e.transform.released_shape(ours) != e.shape:
            raise ValueError(
                f"{ckpt_dir}: {leaf_name(e.path)} has shape {list(shape)}, which does not give {e.key} {list(e.shape)}"
            )
    plan = []  # (out key, shape, entry, row slice)
    for e in entries:
        parts = [(e.key, e.shape, None)] if fmt == "released" else native_parts(e.key, e.shape)
        plan += [(k, s, e, rows) for k, s, rows in parts]
    specs = [(k, s, out_dtype) for k, s, _, _ in plan]
    bar = _progress(sum(int(np.prod(s)) * out_dtype.itemsize for _, s, _ in specs), "jax_to_hf", quiet)
    nonfinite = {k: 0 for k, _, _, _ in plan}

    def arrays_iter():
        cache = (None, None)
        for k, s, e, rows in plan:
            if cache[0] is not e:
                arr = arrays[leaf_name(e.path)]
                x = np.asarray((arr if e.layer is None else arr[e.layer]).read().result())
                cache = (e, e.transform.to_released(x).astype(out_dtype, copy=False))
            x = cache[1] if rows is None else cache[1][rows]
            nonfinite[k] += count_nonfinite(x)
            if strict_finite and nonfinite[k]:
                _report_nonfinite(nonfinite, ckpt_dir, True)
            if bar is not None:
                bar.update(x.nbytes)
            yield x

    side_tmp = None
    if ckpt_dir.startswith("gs://"):  # the source's side files, fetched to a local folder
        side_tmp = tempfile.mkdtemp(prefix="r1v2-side-")
        src_hf = remote_side_files(ckpt_dir, side_tmp)
    else:
        src_hf = os.path.join(ckpt_dir, "hf")
    side = _side_files(src_hf) if os.path.isdir(src_hf) else []
    if fmt == "released":
        if "config.json" in side:
            with open(os.path.join(src_hf, "config.json")) as f:
                config_json = json.load(f)
            config_json["torch_dtype"] = str(out_dtype)
            side.remove("config.json")
        else:
            config_json = released_config_dict(config, str(out_dtype))
        extra = {f: os.path.join(src_hf, f) for f in side}
        extra_json = None if any(f in side for f in _TOKENIZER_FILES) else _img_token_json(config)
    else:
        config_json = native_config_dict(config, str(out_dtype))
        config_json["transformers_version"] = _transformers_version()
        extra = {f: os.path.join(src_hf, f) for f in side if f in _TOKENIZER_FILES and f != "config.json"}
        extra_json = None if extra else _img_token_json(config)
    try:
        names = write_safetensors_dir(
            specs,
            arrays_iter(),
            out_dir,
            config_json=config_json,
            max_shard_bytes=max_shard_bytes,
            overwrite=overwrite,
            extra_json=extra_json,
            extra_files=extra,
        )
    finally:
        if bar is not None:
            bar.close()
        if side_tmp is not None:
            shutil.rmtree(side_tmp, ignore_errors=True)
    if report is not None:
        report["nonfinite"] = {k: v for k, v in nonfinite.items() if v}
    _report_nonfinite(nonfinite, ckpt_dir, False)
    return names


def _img_token_json(config: ModelConfig) -> dict:
    return {
        "tokenizer_config.json": {
            "added_tokens_decoder": {str(config.image_token_id): {"content": "<IMG_CONTEXT>", "special": True}}
        }
    }


__all__ = ["hf_to_jax", "jax_to_hf", "META_FILE"]


TESTED_TRANSFORMERS = "5.24.0"  # the transformers release the native-format export is tested against


def _transformers_version() -> str:
    """The installed transformers' version for a native export's config.json, without importing
    it (it is not a dependency of the core); the tested release when it is not installed."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return TESTED_TRANSFORMERS
