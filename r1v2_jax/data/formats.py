"""Dataset formats on local disk, validated record by record.

Kinds and their fields (JSONL lines, parquet rows, or HF ``datasets`` folders saved with
``save_to_disk``):

* ``rl``:         ``question`` (str), ``answer`` (str); optional ``images`` (str or list),
                  ``choices`` (list of str), ``category`` (str), ``facts`` (list)
* ``preference``: ``prompt``, ``chosen``, ``rejected`` (str); optional ``images``
* ``sft``:        ``prompt``, ``response`` (str); optional ``images``

Image paths resolve under the dataset root (the data file's folder unless given); a path
that escapes it is refused. Images may also be embedded (``{"bytes": ...}`` as HF datasets
store them). A bad record is skipped and counted with its reason (:class:`SkipCounter`);
reading goes on.
"""

from __future__ import annotations

import collections
import glob
import io
import json
import logging
import os
from typing import Any, Iterator

log = logging.getLogger("r1v2_jax.data")

KINDS = {
    "rl": ({"question": str, "answer": str}, {"images": (str, list), "choices": list, "category": str,
                                                "facts": list, "difficulty": (int, float)}),
    "preference": ({"prompt": str, "chosen": str, "rejected": str}, {"images": (str, list), "category": str}),
    "sft": ({"prompt": str, "response": str}, {"images": (str, list), "category": str}),
}


class BadSample(ValueError):
    """A record that cannot be used; ``reason`` is a short category for counting."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class SkipCounter:
    """Counts skipped samples by reason and logs the first few of each."""

    def __init__(self, log_first: int = 5):
        self.counts: collections.Counter = collections.Counter()
        self.log_first = log_first

    def skip(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        if self.counts[reason] <= self.log_first:
            log.warning("skipping sample (%s): %s", reason, detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)


def resolve_under(root: str, rel: str) -> str:
    """``rel`` resolved inside ``root``; raises BadSample if it escapes (.., absolute, symlinks)."""
    root_real = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root_real, rel))
    if os.path.commonpath([root_real, path]) != root_real:
        raise BadSample("path_outside_root", f"{rel!r} resolves to {path}, outside the dataset root {root_real}")
    return path


def validate(record: Any, kind: str, where: str) -> dict:
    """Check a record's fields and types; normalise ``images`` to a list."""
    if kind not in KINDS:
        raise ValueError(f"dataset kind: expected one of {sorted(KINDS)}, got {kind!r}")
    if not isinstance(record, dict):
        raise BadSample("malformed_record", f"{where}: expected an object, got {type(record).__name__}")
    required, optional = KINDS[kind]
    for k, t in required.items():
        if k not in record or record[k] is None:
            raise BadSample("missing_field", f"{where}: field {k!r} is missing")
        if not isinstance(record[k], t):
            raise BadSample("wrong_type", f"{where}: field {k!r} should be {t.__name__}, got {type(record[k]).__name__}")
    out = dict(record)
    for k, t in optional.items():
        if out.get(k) is not None and not isinstance(out[k], t):
            raise BadSample("wrong_type", f"{where}: field {k!r} has type {type(out[k]).__name__}")
    imgs = out.get("images")
    out["images"] = [] if imgs is None else [imgs] if isinstance(imgs, (str, dict)) else list(imgs)
    return out


def _iter_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, BadSample("malformed_json", f"{where}: {e}")


def _iter_arrow_tables(tables, label: str) -> Iterator[tuple[str, Any]]:
    n = 0
    for table in tables:
        for row in table.to_pylist():
            n += 1
            yield f"{label}[{n - 1}]", row


def iter_records(path: str) -> Iterator[tuple[str, Any]]:
    """(where, record or BadSample) for every record of a .jsonl/.json-lines file, a .parquet
    file, a folder of parquet files, or an HF ``save_to_disk`` folder (arrow files)."""
    if os.path.isdir(path):
        arrows = sorted(glob.glob(os.path.join(path, "*.arrow")))
        parquets = sorted(glob.glob(os.path.join(path, "*.parquet")))
        if arrows:
            import pyarrow as pa

            def tables():
                for a in arrows:
                    with pa.memory_map(a) as src:
                        try:
                            yield pa.ipc.open_stream(src).read_all()
                        except pa.ArrowInvalid:
                            yield pa.ipc.open_file(src).read_all()

            yield from _iter_arrow_tables(tables(), path)
            return
        if parquets:
            import pyarrow.parquet as pq

            yield from _iter_arrow_tables((pq.read_table(p) for p in parquets), path)
            return
        raise FileNotFoundError(f"{path}: a folder without *.arrow (HF datasets) or *.parquet files")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        yield from _iter_arrow_tables([pq.read_table(path)], path)
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such dataset file")
    yield from _iter_jsonl(path)


def load_records(path: str, kind: str, skips: SkipCounter | None = None, root: str | None = None) -> list[dict]:
    """All valid records of a dataset, each with ``_root`` (for image paths) and ``_where``."""
    skips = skips if skips is not None else SkipCounter()
    root = root or (path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
    out = []
    for where, rec in iter_records(path):
        if isinstance(rec, BadSample):
            skips.skip(rec.reason, str(rec))
            continue
        try:
            r = validate(rec, kind, where)
        except BadSample as e:
            skips.skip(e.reason, str(e))
            continue
        r["_root"], r["_where"] = root, where
        out.append(r)
    return out


def open_image(record: dict, image: Any):
    """A PIL image for one entry of a record's ``images`` (a path under the root or embedded bytes)."""
    from PIL import Image, UnidentifiedImageError

    where = record.get("_where", "?")
    try:
        if isinstance(image, dict) and image.get("bytes") is not None:
            im = Image.open(io.BytesIO(image["bytes"]))
        else:
            rel = image.get("path") if isinstance(image, dict) else image
            path = resolve_under(record["_root"], rel)
            if not os.path.exists(path):
                raise BadSample("missing_image", f"{where}: {rel!r} does not exist")
            if os.path.getsize(path) == 0:
                raise BadSample("empty_image", f"{where}: {rel!r} is an empty file")
            im = Image.open(path)
        im.load()
    except BadSample:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadSample("unreadable_image", f"{where}: {e}") from None
    if im.size[0] == 0 or im.size[1] == 0:
        raise BadSample("empty_image", f"{where}: zero-size image")
    return im
