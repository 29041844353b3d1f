"""HF-format safetensors checkpoints: read lazily one tensor at a time (never unpickling),
and written atomically.
Publishing the output folder: :mod:`r1v2_jax.convert.publish`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Iterator

import ml_dtypes
import numpy as np

from r1v2_jax.convert.publish import OutputError, fresh_output_dir, publish_dir

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


log = logging.getLogger("r1v2_jax.convert")


class CheckpointFormatError(ValueError):
    """A checkpoint directory is missing files or has a malformed index."""


_NP_DTYPES = {
    "F32": "float32",
    "BF16": "bfloat16",
    "F16": "float16",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _read_header(path: str) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data starts; checks that
    every tensor's bytes lie inside the file (a truncated file is refused here)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFormatError(f"{path}: not a safetensors file (only {size} bytes)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise CheckpointFormatError(
                f"{path}: not a readable safetensors file (header of {n} bytes in a file "
                f"of {size}; truncated or corrupt?)"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointFormatError(f"{path}: not a readable safetensors file (bad header: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: not a readable safetensors file (the header is not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + n
    spans = []
    for k, info in header.items():
        try:
            dtype = np.dtype(_dtype_of(info["dtype"]))
            begin, end = info["data_offsets"]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (begin, end)):
                raise TypeError(f"data_offsets must be two integers, got {info['data_offsets']!r}")
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"]):
                raise TypeError(f"shape must be non-negative integers, got {info['shape']!r}")
            expect = int(np.prod(info["shape"], dtype=np.int64)) * dtype.itemsize
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointFormatError(f"{path}: tensor {k!r} has a malformed header entry ({e})") from None
        if begin < 0 or end < begin:
            raise CheckpointFormatError(
                f"{path}: tensor {k!r} has invalid data_offsets [{begin}, {end}] (negative or reversed)"
            )
        spans.append((begin, end, k))
        if end - begin != expect:
            raise CheckpointFormatError(f"{path}: tensor {k!r} has {end - begin} bytes for shape {info['shape']}")
        if data_start + end > size:
            raise CheckpointFormatError(
                f"{path}: not a readable safetensors file (tensor {k!r} ends at byte "
                f"{data_start + end} but the file has {size}; truncated?)"
            )
    spans.sort()
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointFormatError(
                f"{path}: tensors {k0!r} [{b0}, {e0}] and {k1!r} [{b1}, {e1}] have overlapping data_offsets"
            )
    return header, data_start


def _dtype_of(code: str):
    if code not in _NP_DTYPES:
        raise ValueError(f"unsupported safetensors dtype {code!r}")
    if code == "BF16":
        return ml_dtypes.bfloat16
    return _NP_DTYPES[code]


class SafetensorsDir:
    """The tensors of an HF checkpoint directory (``model.safetensors`` or shards + index).

    ``shapes`` maps every key to its shape (read from the headers only); ``get(key)`` reads
    one tensor into a fresh numpy array with plain positional reads (no memory mapping, so a
    conversion's resident memory is the tensors it holds, not the files it has touched).
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
            hint = (
                (
                    f" (found {pickles}: pickle checkpoints are never loaded; convert them to safetensors "
                    "with a trusted tool first)"
                )
                if pickles
                else ""
            )
            raise CheckpointFormatError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        self._info: dict[str, tuple[str, int, dict]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for fn in files:
            header, start = _read_header(os.path.join(self.path, fn))
            for k, info in header.items():
                if k in self._info:
                    raise CheckpointFormatError(f"{self.path}: key {k!r} is in both {self._info[k][0]} and {fn}")
                if weight_map is not None and weight_map.get(k) != fn:
                    raise CheckpointFormatError(
                        f"{index}: key {k!r} is stored in {fn} but the index says {weight_map.get(k)!r}"
                    )
                self._info[k] = (fn, start, info)
                self.shapes[k] = tuple(info["shape"])
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self._info))
            if absent:
                raise CheckpointFormatError(f"{index}: lists keys not found in any shard: {absent[:10]}")

    def keys(self) -> list[str]:
        return list(self._info)

    def dtype(self, key: str) -> str:
        return self._info[key][2]["dtype"]

    def file_of(self, key: str) -> str:
        """The file (name inside the directory) that holds ``key``."""
        return self._info[key][0]

    def get(self, key: str) -> np.ndarray:
        if key not in self._info:
            raise KeyError(f"{self.path}: no tensor {key!r}")
        fn, start, info = self._info[key]
        return _read_tensor(os.path.join(self.path, fn), start, info, key)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for k in self._info:
            yield k, self.get(k)


def _read_tensor(path: str, start: int, info: dict, key: str) -> np.ndarray:
    """One tensor's bytes by positional reads (no memory map) as a fresh numpy array."""
    begin, end = info["data_offsets"]
    buf = np.empty(end - begin, np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        done, view = 0, memoryview(buf)
        while done < len(buf):
            n = os.preadv(fd, [view[done : done + (1 << 30)]], start + begin + done)
            if n <= 0:
                raise CheckpointFormatError(f"{path}: unexpected end of file reading {key!r}")
            done += n
    finally:
        os.close(fd)
    return buf.view(_dtype_of(info["dtype"])).reshape(info["shape"])


class SafetensorsFile:
    """One safetensors file read like :class:`SafetensorsDir` (``shapes``, ``dtype``, ``get``),
    e.g. a reward model's separate ``value_head.safetensors``."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointFormatError(f"{self.path}: no such file")
        self._header, self._start = _read_header(self.path)
        self.shapes = {k: tuple(v["shape"]) for k, v in self._header.items()}

    def keys(self) -> list[str]:
        return list(self._header)

    def dtype(self, key: str) -> str:
        return self._header[key]["dtype"]

    def get(self, key: str) -> np.ndarray:
        if key not in self._header:
            raise KeyError(f"{self.path}: no tensor {key!r}")
        return _read_tensor(self.path, self._start, self._header[key], key)


def write_safetensors_file(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Write ``tensors`` (in order) as one safetensors file (not atomic: for a file inside a
    directory that is published as a whole)."""
    specs = [(k, tuple(v.shape), np.dtype(v.dtype)) for k, v in tensors.items()]
    _write_shard(path, specs, iter(tensors.values()))


_ST_DTYPES = {
    "float32": "F32",
    "bfloat16": "BF16",
    "float16": "F16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def plan_shards(specs, max_shard_bytes: int) -> list[list[tuple[str, tuple, np.dtype]]]:
    """Split ``(key, shape, dtype)`` specs, in order, into shards of at most ``max_shard_bytes``
    (a single tensor larger than that gets a shard of its own)."""
    shards: list[list] = [[]]
    size = 0
    for key, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, tuple(shape), np.dtype(dtype)))
        size += nbytes
    return shards


def _write_shard(path: str, specs, arrays) -> int:
    """Stream one safetensors file: the header from the specs, then each array's bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape, dtype in specs:
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": _ST_DTYPES[dtype.name], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for key, shape, dtype in specs:
            arr = next(arrays)
            if tuple(arr.shape) != shape or arr.dtype != dtype:
                raise ValueError(
                    f"{path}: tensor {key}: got {arr.dtype}{list(arr.shape)}, planned {dtype}{list(shape)}"
                )
            f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
            del arr
        f.flush()
        os.fsync(f.fileno())
    return offset


def write_safetensors_dir(
    specs,
    arrays,
    out_dir: str | os.PathLike,
    *,
    config_json: dict,
    max_shard_bytes: int = 5 * 1000**3,
    overwrite: bool = False,
    extra_json: dict[str, dict] | None = None,
    extra_files: dict[str, str] | None = None,
) -> list[str]:
    """Write tensors as an HF safetensors directory, streaming one tensor at a time.

    ``specs`` lists ``(key, shape, dtype)`` in order; ``arrays`` yields the matching numpy
    arrays lazily (each is written and dropped before the next is asked for). One
    ``model.safetensors`` when everything fits in ``max_shard_bytes``, else
    ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``. The
    directory is assembled under a temporary name beside ``out_dir`` and renamed into place
    only when complete; an existing non-empty ``out_dir`` is refused unless ``overwrite``.
    ``extra_json`` maps further file names to JSON objects; ``extra_files`` maps file names to
    paths to copy. Returns the shard file names. A write that fails (disk full, read-only) is an
    :class:`OutputError`; nothing is published then.
    """
    out_dir, tmp = fresh_output_dir(out_dir, overwrite)
    try:
        shards = plan_shards(specs, max_shard_bytes)
        n = len(shards)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        it = iter(arrays)
        weight_map, total = {}, 0
        for name, part in zip(names, shards):
            total += _write_shard(os.path.join(tmp, name), part, it)
            weight_map.update({k: name for k, _, _ in part})
        if n > 1:
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        for name, obj in {"config.json": config_json, **(extra_json or {})}.items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=2)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, os.path.join(tmp, name))
        publish_dir(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(
            f"{out_dir}: writing the output failed ({e.strerror or e}); nothing was published "
            "and an existing copy is untouched"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return names
