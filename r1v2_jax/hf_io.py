"""Read HF-format safetensors checkpoints lazily, one tensor at a time. Never unpickles."""

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
