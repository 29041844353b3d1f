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
reading goes on. What counts as bad: malformed JSON or a line that is not UTF-8 (named by
``file:line``), a missing or mistyped field, an ``images`` entry that is neither a path
string nor ``{"bytes": ...}`` / ``{"path": str}``, and (when opened) a missing, empty,
unreadable or too-large image (over the pixel budget of :func:`open_image`).
"""

from __future__ import annotations

import collections
import glob
import io
import json
import logging
import os
import warnings
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from r1v2_jax.data.image import DEFAULT_MAX_MEGAPIXELS, pixel_budget_problem

log = logging.getLogger("r1v2_jax.data")

KINDS = {
    "rl": (
        {"question": str, "answer": str},
        {"images": (str, list), "choices": list, "category": str, "facts": list, "difficulty": (int, float)},
    ),
    "preference": ({"prompt": str, "chosen": str, "rejected": str}, {"images": (str, list), "category": str}),
    "sft": ({"prompt": str, "response": str}, {"images": (str, list), "category": str}),
}


class BadSample(ValueError):
    """A record that cannot be used; ``reason`` is a short category for counting."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class EmptyDataset(ValueError):
    """A dataset with no usable record at all."""


class TooManySkips(RuntimeError):
    """Too many samples in a row were unusable: the data (or its settings) is broken."""


class SkipCounter:
    """Counts skipped samples by reason and logs the first few of each.

    ``consecutive`` counts skips since the last usable sample (:meth:`kept`); past
    ``max_consecutive`` (0: no bound) :meth:`skip` raises :class:`TooManySkips` with the counts
    by reason, so a dataset in which nothing is usable stops instead of spinning forever."""

    def __init__(self, log_first: int = 5, max_consecutive: int = 0):
        self.counts: collections.Counter = collections.Counter()
        self.log_first, self.max_consecutive = log_first, max_consecutive
        self.consecutive = 0

    def skip(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        self.consecutive += 1
        if self.counts[reason] <= self.log_first:
            log.warning("skipping sample (%s): %s", reason, detail)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise TooManySkips(
                f"data: {self.consecutive} samples in a row were unusable, stopping (skipped so far "
                f"by reason: {self.as_dict()}; last: {detail})"
            )

    def kept(self) -> None:
        self.consecutive = 0

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
            raise BadSample(
                "wrong_type", f"{where}: field {k!r} should be {t.__name__}, got {type(record[k]).__name__}"
            )
    out = dict(record)
    for k, t in optional.items():
        if out.get(k) is not None and not isinstance(out[k], t):
            raise BadSample("wrong_type", f"{where}: field {k!r} has type {type(out[k]).__name__}")
    imgs = out.get("images")
    out["images"] = [] if imgs is None else [imgs] if isinstance(imgs, (str, dict)) else list(imgs)
    for i, im in enumerate(out["images"]):
        problem = _image_entry_problem(im)
        if problem:
            raise BadSample("bad_image_entry", f"{where}: images[{i}] {problem}")
    return out


def _image_entry_problem(im: Any) -> str | None:
    """Why an ``images`` entry is unusable (None when it is a path or embedded bytes)."""
    if isinstance(im, str):
        return None if im.strip() else "is an empty path"
    if isinstance(im, dict):
        if isinstance(im.get("bytes"), (bytes, bytearray)) and im["bytes"]:
            return None
        if im.get("bytes") is None and isinstance(im.get("path"), str) and im["path"].strip():
            return None
        return "is an object without non-empty 'bytes' or a 'path' string"
    return f"should be a path string or {{'bytes': ...}}, got {type(im).__name__}"


def _iter_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    # Read bytes and decode line by line: one byte that is not UTF-8 loses its line, not the file.
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, BadSample("bad_utf8", f"{where}: not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
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
            yield from _iter_arrow_tables((pq.read_table(p) for p in parquets), path)
            return
        raise FileNotFoundError(f"{path}: a folder without *.arrow (HF datasets) or *.parquet files")
    if path.endswith(".parquet"):
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
        skips.kept()
    return out


def open_image(record: dict, image: Any, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS):
    """A PIL image for one entry of a record's ``images`` (a path under the root or embedded bytes).

    The pixel budget is checked on the header, before any pixel is decoded: an image of more
    than ``max_megapixels`` million pixels (a decompression bomb: a few KB of PNG can claim
    billions) is a ``BadSample("image_too_large")``. PIL's own hard limit (twice
    ``PIL.Image.MAX_IMAGE_PIXELS``, about 179 MP) is reported under the same reason."""

    where = record.get("_where", "?")
    problem = _image_entry_problem(image)
    if problem:
        raise BadSample("bad_image_entry", f"{where}: image entry {problem}")
    try:
        with warnings.catch_warnings():  # the budget below is ours; PIL's warning would only repeat it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(image, dict) and image.get("bytes") is not None:
                label = "embedded image"
                im = Image.open(io.BytesIO(image["bytes"]))
            else:
                label = image.get("path") if isinstance(image, dict) else image
                path = resolve_under(record["_root"], label)
                if not os.path.exists(path):
                    raise BadSample("missing_image", f"{where}: {label!r} does not exist")
                if os.path.getsize(path) == 0:
                    raise BadSample("empty_image", f"{where}: {label!r} is an empty file")
                im = Image.open(path)
            too_big = pixel_budget_problem(im.size, max_megapixels)
            if too_big:
                raise BadSample("image_too_large", f"{where}: {label!r} {too_big}")
            im.load()
    except BadSample:
        raise
    except Image.DecompressionBombError as e:
        raise BadSample("image_too_large", f"{where}: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadSample("unreadable_image", f"{where}: {e}") from None
    if im.size[0] == 0 or im.size[1] == 0:
        raise BadSample("empty_image", f"{where}: zero-size image")
    return im
