"""Reading a local copy of a Hugging Face Hub data set, whatever way it was saved.

A benchmark's ``--data`` may be:

* the snapshot folder (``huggingface-cli download --repo-type dataset NAME --local-dir DIR``):
  parquet files laid out as the publisher ships them, e.g. ``data/testmini-00000-of-00001-*.parquet``
  or ``Accounting/validation-00000-of-00001.parquet`` (one folder per config);
* a ``save_to_disk`` folder: a ``Dataset`` (``*.arrow`` files directly in it) or a
  ``DatasetDict`` (one sub-folder of ``*.arrow`` files per split), possibly one per config;
* one ``.parquet`` file (all its rows are taken, whatever its split).

:func:`split_sources` finds the files of one split; :func:`rows` reads them, counting bad
rows. Images come as HF ``Image`` features (``{"bytes": ..., "path": ...}``) or as paths
relative to the data root; :func:`image_entry` checks one, :func:`place_images` maps a
benchmark's ``<image N>``-style markers to ``<image>`` placeholders in order.
"""

from __future__ import annotations

import ast
import glob
import os
import re
from typing import Any, Iterator

from r1v2_jax.data.formats import BadSample, SkipCounter, iter_records

IMAGE = "<image>"


def _has_arrow(folder: str) -> bool:
    return bool(glob.glob(os.path.join(folder, "*.arrow")))


def split_sources(path: str, split: str | None) -> list[str]:
    """The parquet files and ``save_to_disk`` folders holding ``split`` under ``path`` (all
    of them when ``split`` is None), sorted. A clear FileNotFoundError when there is none."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder (the benchmark's local copy)")
    if os.path.isfile(path):
        if not path.endswith(".parquet"):
            raise FileNotFoundError(f"{path}: expected a .parquet file or a data set folder")
        return [path]
    if _has_arrow(path):
        return [path]
    found: list[str] = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        in_split = split is not None and os.path.basename(root) == split
        if _has_arrow(root) and (split is None or in_split):
            found.append(root)
            continue
        for f in sorted(files):
            if not f.endswith(".parquet"):
                continue
            stem = f[: -len(".parquet")]
            if split is None or in_split or stem == split or stem.startswith(f"{split}-"):
                found.append(os.path.join(root, f))
    if not found:
        what = (
            f"split {split!r} (files {split}-*.parquet or {split}.parquet, or a folder {split}/)" if split else "data"
        )
        raise FileNotFoundError(f"{path}: no parquet or save_to_disk (*.arrow) files of {what} under it")
    return sorted(found)


def rows(sources: list[str], skips: SkipCounter) -> Iterator[tuple[str, str, dict]]:
    """(source, where, row) for every readable row of ``sources``; unreadable ones are counted."""
    for src in sources:
        for where, rec in iter_records(src):
            if isinstance(rec, BadSample):
                skips.skip(rec.reason, str(rec))
                continue
            if not isinstance(rec, dict):
                skips.skip("malformed_record", f"{where}: expected a row object")
                continue
            yield src, where, rec


def root_of(source: str) -> str:
    """The folder image paths of ``source`` resolve under."""
    return source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))


def field(row: dict, name: str, types, where: str, *, optional: bool = False) -> Any:
    """``row[name]`` checked against ``types``; a BadSample naming the field otherwise."""
    value = row.get(name)
    if value is None:
        if optional:
            return None
        raise BadSample("missing_field", f"{where}: field {name!r} is missing")
    if not isinstance(value, types):
        want = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise BadSample("wrong_type", f"{where}: field {name!r} should be {want}, got {type(value).__name__}")
    return value


def image_entry(value: Any, where: str, name: str) -> dict | str | None:
    """An HF image value (``{"bytes", "path"}`` or a path) as an ``images`` entry; None when absent."""
    if value is None:
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, dict):
        if isinstance(value.get("bytes"), (bytes, bytearray)) and value["bytes"]:
            return {"bytes": bytes(value["bytes"])}
        if isinstance(value.get("path"), str) and value["path"].strip():
            return {"path": value["path"]}
        if value.get("bytes") is None and value.get("path") is None:
            return None
    raise BadSample("bad_image_entry", f"{where}: field {name!r} is neither image bytes nor a path")


def literal_list(text: Any, where: str, name: str) -> list:
    """A list stored as its Python literal (MMMU's ``options``: ``"['a', 'b']"``), or a list."""
    if isinstance(text, list):
        return text
    if not isinstance(text, str):
        raise BadSample("wrong_type", f"{where}: field {name!r} should be a list literal string")
    try:
        value = ast.literal_eval(text) if text.strip() else []
    except (ValueError, SyntaxError):
        raise BadSample("bad_field", f"{where}: field {name!r} is not a list literal: {text[:80]!r}") from None
    if not isinstance(value, list):
        raise BadSample("bad_field", f"{where}: field {name!r} is not a list literal: {text[:80]!r}")
    return value


def place_images(text: str, marker: str, images: dict[int, Any], where: str) -> tuple[str, list]:
    """Replace each match of ``marker`` (a regex whose group 1 is the image number) by
    ``<image>`` and list the images in the order they appear; an image referred to twice is
    given twice. Images no marker refers to come first, one ``<image>`` line each, in number
    order. A marker naming an image that is not there is a BadSample (``missing_image``)."""
    if IMAGE in text:
        raise BadSample("bad_prompt", f"{where}: the text already holds a literal {IMAGE}")
    order: list[Any] = []

    def sub(m: re.Match) -> str:
        n = int(m.group(1))
        if images.get(n) is None:
            raise BadSample("missing_image", f"{where}: {m.group(0)!r} refers to an image the row does not have")
        order.append(images[n])
        return IMAGE

    out = re.sub(marker, sub, text)
    used = {int(m.group(1)) for m in re.finditer(marker, text)}
    extra = [images[n] for n in sorted(images) if images[n] is not None and n not in used]
    if extra:
        out = IMAGE + "\n" + (IMAGE + "\n") * (len(extra) - 1) + out
    return out, extra + order


def collect(rows, skips: SkipCounter, make) -> list[dict]:
    """The items ``make(src, where, row, n)`` builds from :func:`rows`' ``(src, where, row)``
    (``n`` counts the rows): a row it refuses (``BadSample``) is skipped with its reason, one
    it returns None for is left out (not this split), a repeated ``id`` is ``duplicate_id``."""
    out, seen = [], set()
    for n, (src, where, row) in enumerate(rows):
        try:
            it = make(src, where, row, n)
        except BadSample as e:
            skips.skip(e.reason, str(e))
            continue
        if it is None:
            continue
        if it["id"] in seen:
            skips.skip("duplicate_id", f"{where}: id {it['id']!r} seen before")
            continue
        seen.add(it["id"])
        out.append(it)
        skips.kept()
    return out
