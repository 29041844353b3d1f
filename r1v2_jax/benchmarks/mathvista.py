"""MathVista (``AI4Math/MathVista`` on the Hub), split ``testmini`` (1000 questions; the
``test`` split's answers are hidden, so it is not offered).

**Layout read**: ``data/testmini-00000-of-00001-*.parquet`` (or a ``save_to_disk`` folder).

**Schema** (per row): ``pid`` str, ``question`` str, ``image`` str (the image's path in the
publisher's ``images/`` folder), ``decoded_image`` Image (``{"bytes", "path"}``), ``choices``
list of str (null for free-form), ``unit`` str or null, ``precision`` float or null (decimal
places of a float answer), ``answer`` str (for multiple choice: the *text* of the correct
choice), ``question_type`` str (``multi_choice`` / ``free_form``), ``answer_type`` str
(``text`` / ``integer`` / ``float`` / ``list``), ``metadata`` struct (``category``,
``context``, ``grade``, ``img_height``, ``img_width``, ``language``, ``skills`` list of str,
``source``, ``split``, ``task``), ``query`` str (the question with its hint and choices, as
the reference evaluation prompts).

**Prompt**: ``<image>`` then ``query``. The image is ``decoded_image``; a row without it falls
back to ``image`` as a path under the data root.

**Scoring** (MathVista's ``extract_answer`` + ``normalize_extracted_answer`` + ``safe_equal``).
The reference extracts with GPT-4 after a few quick rules; we use rules only, on the text
after ``</think>``: a response that *is* one of the choices is taken as is; multiple choice:
the letter our verifier's :func:`~r1v2_jax.rewards.verifier.extract_choice` reads (boxed
content, "the answer is", a set-off letter), else the extracted answer text; free form: the
last ``\\boxed{}``, else "the answer is ...", else the last line. Then the reference's
normalisation: a letter (also "(B) text") becomes its choice's text, any other text the most
similar choice by Levenshtein distance (on its last 2000 characters, to bound the cost);
``integer`` -> ``str(int(float(x)))``; ``float`` -> ``str(round(float(x), precision))``;
``list`` as text. Before ``float`` we drop LaTeX
wrappers, ``$``, thousands commas, ``%``, the row's unit and, when the text is not a number,
keep its last number (the extraction GPT-4 would have done). Correct iff equal to ``answer``.

Breakdowns: ``task``, ``skills`` (an item counts under each of its skills), ``context``,
``grade``, ``question_type``, ``answer_type``.
"""

from __future__ import annotations

import re

from r1v2_jax.benchmarks import hub
from r1v2_jax.benchmarks.base import Benchmark, Score, item, register
from r1v2_jax.data.formats import BadSample, SkipCounter
from r1v2_jax.rewards.verifier import _untex, after_thinking, extract_answer, extract_choice


def _row_item(row: dict, where: str, root: str) -> dict:
    pid = hub.field(row, "pid", (str, int), where)
    query = hub.field(row, "query", str, where)
    answer = hub.field(row, "answer", str, where)
    qtype = hub.field(row, "question_type", str, where)
    atype = hub.field(row, "answer_type", str, where)
    if qtype not in ("multi_choice", "free_form"):
        raise BadSample("bad_field", f"{where}: field 'question_type' is {qtype!r}")
    if atype not in ("text", "integer", "float", "list"):
        raise BadSample("bad_field", f"{where}: field 'answer_type' is {atype!r}")
    choices = [str(c) for c in (hub.field(row, "choices", list, where, optional=True) or [])]
    if qtype == "multi_choice" and not choices:
        raise BadSample("bad_field", f"{where}: a multi_choice question without choices")
    precision = hub.field(row, "precision", (int, float), where, optional=True)
    if atype == "float" and precision is None:
        raise BadSample("missing_field", f"{where}: field 'precision' is missing for a float answer")
    image = hub.image_entry(row.get("decoded_image"), where, "decoded_image") or hub.image_entry(
        row.get("image"), where, "image"
    )
    if image is None:
        raise BadSample("missing_image", f"{where}: neither 'decoded_image' nor 'image' holds an image")
    md = row.get("metadata") or {}
    skills = [str(s) for s in (md.get("skills") or [])]
    return item(
        id=str(pid),
        question=f"{hub.IMAGE}\n{query}",
        answer=answer,
        images=[image],
        choices=choices,
        category=str(md.get("task") or ""),
        meta={
            "question_type": qtype,
            "answer_type": atype,
            "precision": precision,
            "unit": row.get("unit") or "",
            "choices": choices,
        },
        breakdown={
            "task": str(md.get("task") or ""),
            "skills": skills,
            "context": str(md.get("context") or ""),
            "grade": str(md.get("grade") or ""),
            "question_type": qtype,
            "answer_type": atype,
        },
        root=root,
        where=where,
    )


def load(path: str, split: str, skips: SkipCounter) -> list[dict]:
    rows = hub.rows(hub.split_sources(path, split), skips)
    return hub.collect(rows, skips, lambda src, where, row, n: _row_item(row, where, hub.root_of(src)))


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


MAX_SIMILARITY_CHARS = 2000
_NUMBER = re.compile(r"(?<![\^\d.])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")  # not an exponent (cm^2)


def _numeric_text(text: str, unit: str) -> str:
    t = _untex(text)
    if unit:
        t = t.replace(unit, " ")
    t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", t).replace("%", " ").strip()
    try:
        float(t)
        return t
    except ValueError:
        nums = _NUMBER.findall(t)
        return nums[-1] if nums else t


def normalize_extracted(extraction: str, meta: dict) -> str | None:
    """MathVista's ``normalize_extracted_answer`` (with the number clean-up described above)."""
    if meta["question_type"] == "multi_choice":
        choices = meta["choices"]
        extraction = extraction.strip()
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letter:
            extraction = letter[0].upper()
        letters = [chr(65 + i) for i in range(len(choices))]
        if extraction in letters:
            return choices[letters.index(extraction)]
        tail = extraction[-MAX_SIMILARITY_CHARS:]  # bounded cost for a response without line breaks
        dist = [levenshtein(tail, c) for c in choices]
        return choices[dist.index(min(dist))]
    atype = meta["answer_type"]
    if atype == "integer":
        try:
            return str(int(float(_numeric_text(extraction, meta["unit"]))))
        except (ValueError, OverflowError):
            return None
    if atype == "float":
        try:
            return str(round(float(_numeric_text(extraction, meta["unit"])), int(meta["precision"])))
        except (ValueError, OverflowError):
            return None
    return extraction.strip()


def extract(meta: dict, response: str) -> str:
    text = after_thinking(response)
    if not text:
        return ""
    if meta["question_type"] == "multi_choice":
        if text in meta["choices"]:
            return text
        letter = extract_choice(response, meta["choices"])
        if letter is not None:
            return letter
    return extract_answer(response)


def score(it: dict, response: str) -> Score:
    meta = it["meta"]
    raw = extract(meta, response)
    if not raw:
        return Score(0.0, None, "no_answer")
    pred = normalize_extracted(raw, meta)
    if pred is None:
        return Score(0.0, raw, "not_a_number")
    return Score(float(pred == it["answer"]), pred)


BENCHMARK = register(
    Benchmark(
        name="mathvista",
        splits=("testmini",),
        default_split="testmini",
        load=load,
        score=score,
        description="MathVista (AI4Math/MathVista) testmini: visual maths, multiple choice and free form",
    )
)
