"""HF-format safetensors checkpoints: read lazily one tensor at a time (never unpickling),
and written atomically."""

from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np
import safetensors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


class CheckpointFormatError(ValueError):
    """A checkpoint directory is missing files or has a malformed index."""


class SafetensorsDir:
    """The tensors of an HF checkpoint directory (``model.safetensors`` or shards + index).

    ``shapes`` maps every key to its shape (read from the headers only); ``get(key)`` reads
    one tensor as a numpy array (bfloat16 via ml_dtypes).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointFormatError(f"{self.path}: not a directory")
        index = os.path.join(self.path, INDEX_FILE)
        single = os.path.join(self.path, SINGLE_FILE)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointFormatError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
            files = sorted(set(weight_map.values()))
            for fn in files:
                if not os.path.exists(os.path.join(self.path, fn)):
                    raise CheckpointFormatError(f"{index}: lists shard {fn!r}, which is not in {self.path}")
        elif os.path.exists(single):
            weight_map, files = None, [SINGLE_FILE]
        else:
            pickles = [p for p in PICKLE_FILES if os.path.exists(os.path.join(self.path, p))]
            hint = (f" (found {pickles}: pickle checkpoints are never loaded; convert them to safetensors "
                    "with a trusted tool first)") if pickles else ""
            raise CheckpointFormatError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        self._handles = {fn: safetensors.safe_open(os.path.join(self.path, fn), framework="numpy") for fn in files}
        self._where: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for fn, h in self._handles.items():
            for k in h.keys():
                if k in self._where:
                    raise CheckpointFormatError(f"{self.path}: key {k!r} is in both {self._where[k]} and {fn}")
                if weight_map is not None and weight_map.get(k) != fn:
                    raise CheckpointFormatError(f"{index}: key {k!r} is stored in {fn} but the index says "
                                                f"{weight_map.get(k)!r}")
                self._where[k] = fn
                self.shapes[k] = tuple(h.get_slice(k).get_shape())
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self._where))
            if absent:
                raise CheckpointFormatError(f"{index}: lists keys not found in any shard: {absent[:10]}")

    def keys(self) -> list[str]:
        return list(self._where)

    def dtype(self, key: str) -> str:
        return self._handles[self._where[key]].get_slice(key).get_dtype()

    def get(self, key: str) -> np.ndarray:
        if key not in self._where:
            raise KeyError(f"{self.path}: no tensor {key!r}")
        return self._handles[self._where[key]].get_tensor(key)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for k in self._where:
            yield k, self.get(k)


def write_safetensors_dir(tensors, out_dir: str | os.PathLike, *, config_json: dict,
                          max_shard_bytes: int = 5 * 1024**3, overwrite: bool = False,
                          extra_json: dict[str, dict] | None = None) -> list[str]:
    """Write ``(key, numpy array)`` pairs as an HF safetensors directory.

    One ``model.safetensors`` when everything fits in ``max_shard_bytes``, else
    ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``. The
    directory is assembled under a temporary name beside ``out_dir`` and renamed into place
    only when complete; an existing non-empty ``out_dir`` is refused unless ``overwrite``.
    ``extra_json`` maps further file names to JSON objects written alongside.
    Returns the shard file names.
    """
    import shutil
    import tempfile

    from safetensors.numpy import save_file

    out_dir = os.fspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: exists and is not empty (pass overwrite=True to replace it)")
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    try:
        shards: list[dict] = [{}]
        size = 0
        for key, arr in tensors:
            arr = np.ascontiguousarray(arr)
            if shards[-1] and size + arr.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = arr
            size += arr.nbytes
        n = len(shards)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map, total = {}, 0
        for name, part in zip(names, shards):
            save_file(part, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
            total += sum(a.nbytes for a in part.values())
            part.clear()
        if n > 1:
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        for name, obj in {"config.json": config_json, **(extra_json or {})}.items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return names
