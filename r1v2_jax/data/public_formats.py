"""Converters from public RL / preference training sets to our ``rl`` / ``preference`` JSONL.

Both write a folder ``OUT/`` holding ``data.jsonl`` and ``images/`` (our JSONL names image
files relative to its folder, see :mod:`r1v2_jax.data.formats`; JSON has no bytes, so
embedded images become files), built beside ``OUT`` and renamed into place when complete: a
failed or killed conversion leaves nothing at ``OUT``. An existing ``OUT`` is refused without
``overwrite``; with it, the old folder is set aside, the new one renamed in, the old removed.
A bad row is skipped and counted by reason (:class:`~r1v2_jax.data.formats.SkipCounter`),
never fatal.

**verl / EasyR1 multimodal RL** (:func:`convert_rl`), one row per prompt, read from a parquet
file, a folder of them (an HF snapshot's ``data/``), a ``save_to_disk`` folder or JSONL:

* EasyR1 (``hiyouga/geometry3k``, ``data.prompt_key=problem``): ``problem`` (str),
  ``answer`` (str), ``images`` (list of ``{"bytes", "path"}`` image structs, or of path
  strings under the source folder; absent or empty: text only);
* verl (``examples/data_preprocess/geo3k.py``): ``prompt`` (a chat list of
  ``{"role", "content"}``; the last ``user`` turn is the question, a ``system`` turn is kept
  in ``meta.system``), ``images`` as above, ``reward_model.ground_truth`` (the answer),
  ``data_source`` (kept as ``category``), ``extra_info`` (dropped).

A number answer is written as its text. The question holds one ``<image>`` per image, in
order: a question without any placeholder gets ``<image>\\n`` per image in front (InternVL's
convention); any other count that differs from the images is a skip
(``image_placeholder_mismatch``).

**InternVL MMPR preference pairs** (:func:`convert_mmpr`): ``--from`` a meta file (JSON:
``{name: {"root": image folder, "annotation": JSONL file, ...}}``, relative paths resolved
from the meta file's folder, or from the one above it when only that holds them, as in
InternVL's own meta files: ``MMPR/images/...``) or one annotation JSONL (images under ``image_root``, default
its folder). Each line: ``image`` (a path under the root, a list of them, or absent),
``question``, ``chosen``, ``rejected`` (str), optional ``system_prompt`` (kept in
``meta.system``). Images are hard-linked (copied across file systems) into
``OUT/images/<dataset>/``, each once however many pairs share it. Skipped too: identical or
empty chosen/rejected.

Images are checked on their header (readable, not empty, within the pixel budget); pixels
are decoded when training opens them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import warnings
from typing import Any, Callable

from PIL import Image, UnidentifiedImageError

from r1v2_jax.data.formats import BadSample, SkipCounter, iter_records, resolve_under, validate
from r1v2_jax.data.image import DEFAULT_MAX_MEGAPIXELS, pixel_budget_problem

_EXT = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "BMP": "bmp", "WEBP": "webp", "TIFF": "tif"}


# ---- writing a folder atomically --------------------------------------------------------------


def _publish(build: Callable[[str], dict], out_dir: str, overwrite: bool) -> dict:
    """Run ``build(tmp_dir)`` in a fresh folder beside ``out_dir``, then rename it into place."""
    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: exists (use --overwrite to replace it)")
    if os.path.islink(out_dir):
        raise FileExistsError(f"{out_dir}: is a symlink; refusing to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        result = build(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.lexists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "x"))
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# ---- images -------------------------------------------------------------------------------------


def _image_header(opener: Callable[[], Any], label: str, where: str, max_megapixels: float) -> str:
    """The format of an image (checked on its header), or BadSample."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with opener() as im:
                fmt, size = im.format, im.size
    except Image.DecompressionBombError as e:
        raise BadSample("image_too_large", f"{where}: {label}: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadSample("unreadable_image", f"{where}: {label}: {e}") from None
    if size[0] == 0 or size[1] == 0:
        raise BadSample("empty_image", f"{where}: {label}: zero-size image")
    too_big = pixel_budget_problem(size, max_megapixels)
    if too_big:
        raise BadSample("image_too_large", f"{where}: {label} {too_big}")
    return fmt or ""


class _Images:
    """Puts images under ``out/images``: bytes written as files, source files linked once."""

    def __init__(self, out: str, max_megapixels: float):
        self.out, self.max_mp = out, max_megapixels
        self.linked: dict[str, str] = {}
        self.n = 0

    def from_bytes(self, data: bytes, where: str, stem: str) -> str:
        fmt = _image_header(lambda: Image.open(io.BytesIO(data)), "embedded image", where, self.max_mp)
        rel = f"images/{stem}.{_EXT.get(fmt, 'img')}"
        with open(os.path.join(self.out, rel), "wb") as f:
            f.write(data)
        self.n += 1
        return rel

    def from_file(self, root: str, path: str, where: str, sub: str) -> str:
        src = resolve_under(root, path)
        if src in self.linked:
            return self.linked[src]
        if not os.path.isfile(src):
            raise BadSample("missing_image", f"{where}: {path!r} does not exist under {root}")
        if os.path.getsize(src) == 0:
            raise BadSample("empty_image", f"{where}: {path!r} is an empty file")
        _image_header(lambda: Image.open(src), repr(path), where, self.max_mp)
        rel = os.path.join("images", sub, os.path.relpath(src, os.path.realpath(root)))
        dst = os.path.join(self.out, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        self.linked[src] = rel
        self.n += 1
        return rel


def _with_placeholders(text: str, n_images: int, where: str) -> str:
    k = text.count("<image>")
    if k == n_images:
        return text
    if k == 0:
        return "<image>\n" * n_images + text
    raise BadSample("image_placeholder_mismatch", f"{where}: {k} <image> placeholders for {n_images} images")


def _answer_text(x: Any, field: str, where: str) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return repr(x) if isinstance(x, float) else str(x)
    if x is None:
        raise BadSample("missing_field", f"{where}: field {field!r} is missing")
    raise BadSample("wrong_type", f"{where}: field {field!r} should be a string or number, got {type(x).__name__}")


def _text(row: dict, field: str, where: str) -> str:
    x = row.get(field)
    if x is None:
        raise BadSample("missing_field", f"{where}: field {field!r} is missing")
    if not isinstance(x, str):
        raise BadSample("wrong_type", f"{where}: field {field!r} should be str, got {type(x).__name__}")
    return x


def _image_list(x: Any, where: str) -> list:
    if x is None:
        return []
    if isinstance(x, (str, dict)):
        return [x]
    if isinstance(x, (list, tuple)):
        return list(x)
    raise BadSample("bad_image_entry", f"{where}: images should be a list, got {type(x).__name__}")


def _place_images(entries: list, images: _Images, root: str, where: str, n: int, sub: str) -> list[str]:
    out = []
    for k, im in enumerate(entries):
        if isinstance(im, dict) and isinstance(im.get("bytes"), (bytes, bytearray)) and im["bytes"]:
            out.append(images.from_bytes(bytes(im["bytes"]), where, f"{n:08d}_{k}"))
        elif isinstance(im, dict) and im.get("bytes") is None and isinstance(im.get("path"), str) and im["path"]:
            out.append(images.from_file(root, im["path"], where, sub))
        elif isinstance(im, str) and im.strip():
            out.append(images.from_file(root, im, where, sub))
        else:
            raise BadSample("bad_image_entry", f"{where}: images[{k}] is neither image bytes nor a path")
    return out


# ---- verl / EasyR1 -> rl -----------------------------------------------------------------------


def rl_record(row: Any, where: str) -> tuple[dict, list]:
    """(our rl record without images, the row's image entries) for an EasyR1 or verl row."""
    if not isinstance(row, dict):
        raise BadSample("malformed_record", f"{where}: expected an object")
    meta: dict = {}
    if "problem" in row:  # EasyR1
        question = _text(row, "problem", where)
        answer = _answer_text(row.get("answer"), "answer", where)
        category = ""
    elif "prompt" in row:  # verl
        chat = row["prompt"]
        if not isinstance(chat, (list, tuple)) or not all(isinstance(m, dict) for m in chat):
            raise BadSample("wrong_type", f"{where}: field 'prompt' should be a list of {{role, content}} turns")
        users = [m.get("content") for m in chat if m.get("role") == "user"]
        if not users or not isinstance(users[-1], str):
            raise BadSample("missing_field", f"{where}: 'prompt' has no user turn with string content")
        question = users[-1]
        system = [m.get("content") for m in chat if m.get("role") == "system" and isinstance(m.get("content"), str)]
        if system:
            meta["system"] = system[0]
        rm = row.get("reward_model")
        if not isinstance(rm, dict):
            raise BadSample("missing_field", f"{where}: field 'reward_model' (with ground_truth) is missing")
        answer = _answer_text(rm.get("ground_truth"), "reward_model.ground_truth", where)
        category = row.get("data_source") if isinstance(row.get("data_source"), str) else ""
    else:
        raise BadSample("missing_field", f"{where}: neither 'problem' (EasyR1) nor 'prompt' (verl) is there")
    if not question.strip():
        raise BadSample("empty_question", f"{where}: the question is empty")
    rec = {"question": question, "answer": answer}
    if category:
        rec["category"] = category
    if meta:
        rec["meta"] = meta
    return rec, _image_list(row.get("images"), where)


def _write_valid(f, rows, make, kind: str, skips: SkipCounter, n: int) -> int:
    """Write ``make(where, row, n)`` of every usable ``(where, row)`` as a JSON line of ``kind``
    (``n``: records written so far, returned updated); a row that is a ``BadSample``, or whose
    record ``make`` or :func:`validate` refuses, is skipped with its reason."""
    for where, row in rows:
        try:
            if isinstance(row, BadSample):
                raise row
            rec = make(where, row, n)
            validate(rec, kind, where)
        except BadSample as e:
            skips.skip(e.reason, str(e))
            continue
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        n += 1
        skips.kept()
    return n


def convert_rl(
    src: str,
    out_dir: str,
    *,
    overwrite: bool = False,
    skips: SkipCounter | None = None,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
) -> dict:
    """verl / EasyR1 parquet (or arrow, JSONL) -> ``OUT/data.jsonl`` (``rl``) + ``OUT/images/``."""
    skips = skips if skips is not None else SkipCounter()
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src}: no such file or folder")
    root = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))

    def build(tmp: str) -> dict:
        os.makedirs(os.path.join(tmp, "images"))
        images, n = _Images(tmp, max_megapixels), 0

        def make(where, row, n):
            rec, entries = rl_record(row, where)
            rec["question"] = _with_placeholders(rec["question"], len(entries), where)
            rec["images"] = _place_images(entries, images, root, where, n, "src")
            return rec

        with open(os.path.join(tmp, "data.jsonl"), "w", encoding="utf-8") as f:
            n = _write_valid(f, iter_records(src), make, "rl", skips, n)
        return {"written": n, "images": images.n, "skipped": skips.as_dict()}

    return _publish(build, out_dir, overwrite)


# ---- MMPR -> preference -------------------------------------------------------------------------


def _mmpr_sources(src: str, image_root: str | None) -> list[tuple[str, str, str]]:
    """(dataset name, annotation JSONL, image root) for a meta file or one annotation file."""
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src}: no such meta or annotation file")
    if src.endswith(".jsonl"):
        return [(os.path.splitext(os.path.basename(src))[0], src, image_root or os.path.dirname(os.path.abspath(src)))]
    try:
        with open(src, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{src}: not a JSON meta file ({e})") from None
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"{src}: a meta file maps dataset names to {{root, annotation}}")
    base = os.path.dirname(os.path.abspath(src))
    out = []
    for name, entry in meta.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("annotation"), str)):
            raise ValueError(f"{src}: entry {name!r} has no 'annotation' path")
        root = entry.get("root") if isinstance(entry.get("root"), str) else ""
        out.append((str(name), _from_meta(base, entry["annotation"]), image_root or _from_meta(base, root)))
    return out


def _from_meta(base: str, rel: str) -> str:
    """A meta file's path: as given if absolute, else from the meta file's folder, or from the
    folder above it when only that exists (InternVL's own meta files name ``MMPR/images/...``
    from the folder holding ``MMPR/``)."""
    if os.path.isabs(rel):
        return rel
    here, above = os.path.join(base, rel), os.path.join(os.path.dirname(base), rel)
    return above if not os.path.exists(here) and os.path.exists(above) else here


def preference_record(row: Any, where: str) -> tuple[dict, list]:
    """(our preference record without images, the row's image paths) for an MMPR line."""
    if not isinstance(row, dict):
        raise BadSample("malformed_record", f"{where}: expected an object")
    q, chosen, rejected = (_text(row, k, where) for k in ("question", "chosen", "rejected"))
    if not chosen.strip() or not rejected.strip():
        raise BadSample("empty_response", f"{where}: chosen or rejected is empty")
    if chosen == rejected:
        raise BadSample("identical_pair", f"{where}: chosen and rejected are the same text")
    rec: dict = {"prompt": q, "chosen": chosen, "rejected": rejected}
    if isinstance(row.get("system_prompt"), str) and row["system_prompt"]:
        rec["meta"] = {"system": row["system_prompt"]}
    entries = _image_list(row.get("image") or None, where)
    if any(not isinstance(p, str) or not p.strip() for p in entries):
        raise BadSample("bad_image_entry", f"{where}: image should be a path or a list of paths")
    return rec, entries


def convert_mmpr(
    src: str,
    out_dir: str,
    *,
    image_root: str | None = None,
    overwrite: bool = False,
    skips: SkipCounter | None = None,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
) -> dict:
    """MMPR (meta file or annotation JSONL) -> ``OUT/data.jsonl`` (``preference``) + images."""
    skips = skips if skips is not None else SkipCounter()
    sources = _mmpr_sources(src, image_root)
    for _name, ann, _root in sources:
        if not os.path.isfile(ann):
            raise FileNotFoundError(f"{src}: annotation file {ann} does not exist")

    def build(tmp: str) -> dict:
        os.makedirs(os.path.join(tmp, "images"))
        images, n = _Images(tmp, max_megapixels), 0
        with open(os.path.join(tmp, "data.jsonl"), "w", encoding="utf-8") as f:
            for name, ann, root in sources:
                sub = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "data"

                def make(where, row, n, name=name, root=root, sub=sub):
                    rec, entries = preference_record(row, where)
                    rec["prompt"] = _with_placeholders(rec["prompt"], len(entries), where)
                    rec["images"] = _place_images(entries, images, root, where, n, sub)
                    rec["category"] = name
                    return rec

                n = _write_valid(f, iter_records(ann), make, "preference", skips, n)
        return {"written": n, "images": images.n, "skipped": skips.as_dict()}

    return _publish(build, out_dir, overwrite)
