"""``load_pretrained``: a released-format HF directory -> a ready :class:`R1V2Model`."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from r1v2_jax.convert.hf_config import read_config
from r1v2_jax.convert.keymap import key_entries, params_to_released, released_to_params
from r1v2_jax.convert.param_store import checkpoint_config, is_checkpoint, load_params
from r1v2_jax.convert.safetensors_io import SafetensorsDir, write_safetensors_dir
from r1v2_jax.convert.transformers_format import released_config_dict
from r1v2_jax.model.config import DTYPES, ConfigError
from r1v2_jax.model.vlm import R1V2Model, param_shardings
from r1v2_jax.parallel.sharding import DEFAULT_RULES


def load_pretrained(
    path: str | os.PathLike,
    dtype: str = "float32",
    *,
    mesh=None,
    rules=DEFAULT_RULES,
    scan_layers: bool = True,
    remat_policy: str = "none",
    image_token_id: int | None = None,
    strict: bool = True,
) -> R1V2Model:
    """Load a released-format checkpoint (``config.json`` + safetensors, sharded or not).

    Args:
      path: the HF directory (as downloaded from ``Skywork/Skywork-R1V2-38B``).
      dtype: parameter and compute dtype (``float32``, ``bfloat16`` or ``float16``).
      mesh: optional ``data`` x ``fsdp`` x ``tensor`` mesh; parameters are placed sharded on it.
      scan_layers / remat_policy: how the towers run (see :class:`r1v2_jax.model.config.ModelConfig`).
      image_token_id: the ``<IMG_CONTEXT>`` id; by default read from the tokenizer files.
      strict: refuse unknown ``config.json`` keys (see :mod:`r1v2_jax.convert.hf_config`).

    Tensors are read one at a time; a missing key, an extra key or a wrong shape raises
    :class:`r1v2_jax.convert.keymap.CheckpointKeyError` naming the key and both shapes.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"load_pretrained: dtype must be one of {DTYPES}, got {dtype!r}")
    config = read_config(
        path,
        image_token_id=image_token_id,
        strict=strict,
        dtype=dtype,
        param_dtype=dtype,
        scan_layers=scan_layers,
        remat_policy=remat_policy,
    )
    store = SafetensorsDir(path)
    host = released_to_params(store.get, store.shapes, config, dtype=jnp.dtype(dtype), source=os.fspath(path))
    if mesh is None:
        params = jax.tree.map(jnp.asarray, host)
    else:
        shardings = param_shardings(config, mesh, rules)
        params = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), host, shardings)
    return R1V2Model(config, params, mesh, rules)


def save_released(
    model: R1V2Model,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 1000**3,
    overwrite: bool = False,
    image_context_token: str = "<IMG_CONTEXT>",
) -> list[str]:
    """Write ``model`` in the released format (safetensors shards, index, config.json, and a
    tokenizer_config.json naming the ``<IMG_CONTEXT>`` id).

    Tensors are converted one at a time. ``dtype`` casts on the way out (default: as stored).
    """

    np_dtype = None if dtype is None else jnp.dtype(dtype)
    stored = str(np_dtype or jnp.dtype(model.config.param_dtype))
    entries = key_entries(model.config)
    specs = [(e.key, e.shape, np_dtype or jnp.dtype(model.config.param_dtype)) for e in entries]
    arrays = (v if np_dtype is None else v.astype(np_dtype) for _, v in params_to_released(model.params, model.config))
    tokenizer = {
        "added_tokens_decoder": {str(model.config.image_token_id): {"content": image_context_token, "special": True}}
    }
    return write_safetensors_dir(
        specs,
        arrays,
        out_dir,
        config_json=released_config_dict(model.config, stored),
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
        extra_json={"tokenizer_config.json": tokenizer},
    )


def load_checkpoint(
    ckpt_dir: str | os.PathLike,
    dtype: str | None = None,
    *,
    mesh=None,
    rules=DEFAULT_RULES,
    scan_layers: bool = True,
    remat_policy: str = "none",
) -> R1V2Model:
    """Load our parameter checkpoint (written by ``tools/convert_weights/hf_to_jax.py``), sharded
    on ``mesh`` when given: each device reads only its own shard."""

    opts = dict(scan_layers=scan_layers, remat_policy=remat_policy)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConfigError(f"load_checkpoint: dtype must be one of {DTYPES}, got {dtype!r}")
        opts.update(dtype=dtype, param_dtype=dtype)
    config = checkpoint_config(os.fspath(ckpt_dir), **opts)
    config, params = load_params(os.fspath(ckpt_dir), config, mesh=mesh, rules=rules)
    return R1V2Model(config, params, mesh, rules)


def load_model(path: str | os.PathLike, dtype: str | None = None, **kw) -> R1V2Model:
    """Either format: our checkpoint (it has ``r1v2_params.json``) via :func:`load_checkpoint`,
    otherwise a released HF directory via :func:`load_pretrained` (float32 unless ``dtype``)."""

    if is_checkpoint(os.fspath(path)):
        return load_checkpoint(path, dtype, **kw)
    return load_pretrained(path, dtype or "float32", **kw)
