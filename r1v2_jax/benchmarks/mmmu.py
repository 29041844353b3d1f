"""MMMU (``MMMU/MMMU`` on the Hub): 30 subjects, multiple-choice and open questions, up to 7 images.

**Layout read**: one config per subject, each a folder of parquet files per split, as the
snapshot ships it: ``<root>/<Subject>/{dev,validation,test}-00000-of-00001.parquet`` (or a
``save_to_disk`` folder per subject, or one parquet file). Splits: ``validation`` (default,
900 questions, what papers report) and ``dev``; ``test`` answers are hidden, so it is not offered.

**Schema** (per row): ``id`` str (``validation_Art_Theory_12``: split, subject, number),
``question`` str, ``options`` str (a Python list literal, ``"['$6', '$7']"``; ``"[]"`` for
open questions), ``explanation`` str, ``image_1`` … ``image_7`` Image (``{"bytes", "path"}``
or null), ``img_type`` str, ``answer`` str (a letter, or the open answer; a list literal of
several accepted answers in a few rows), ``topic_difficulty`` str, ``question_type`` str
(``multiple-choice`` / ``open``), ``subfield`` str.

**Prompt** (MMMU's reference ``construct_prompt``): the question, a blank line, the options
as ``(A) text`` lines, a blank line, then "Answer with the option's letter from the given
choices directly."; open questions end with "Answer the question using a single word or
phrase." ``<image N>`` markers (in the question and in options) become ``<image>``
placeholders with ``image_N``, in the order they appear (see :func:`hub.place_images`).

**Scoring** (MMMU's ``parse_multi_choice_response`` / ``parse_open_response`` and
``eval_multi_choice`` / ``eval_open``), read on the text after ``</think>``, on the last
``\\boxed{}`` content when there is one. Multiple choice: a bracketed letter ``(B)``, else a
letter set off by spaces, else (responses over 5 words) an option's text; several candidates:
the one that occurs last. Where the reference picks a random letter when nothing is found we
score 0 (``no_answer``): a random guess would make pass@1 depend on a seed. Open: the
shortest tails after "could be / so / is / thus / therefore / final / answer / result" (and
"=" on the last line) of each line, plus every number in them; numbers compared rounded to 2
decimals, strings by containment of the normalised gold. (The reference splits sentences with
``\\.\\s(?=[A-Z])`` after lower-casing, so in effect only at line breaks; we keep that.)

Breakdowns: ``subject``, ``discipline`` (MMMU's six), ``question_type``, ``difficulty``.
"""

from __future__ import annotations

import re

from r1v2_jax.benchmarks import hub
from r1v2_jax.benchmarks.base import Benchmark, Score, item, register
from r1v2_jax.data.formats import BadSample, SkipCounter
from r1v2_jax.rewards.verifier import after_thinking, last_boxed

DISCIPLINES = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": (
        "Basic_Medical_Science",
        "Clinical_Medicine",
        "Diagnostics_and_Laboratory_Medicine",
        "Pharmacy",
        "Public_Health",
    ),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": (
        "Agriculture",
        "Architecture_and_Engineering",
        "Computer_Science",
        "Electronics",
        "Energy_and_Power",
        "Materials",
        "Mechanical_Engineering",
    ),
}
DISCIPLINE_OF = {s: d for d, subjects in DISCIPLINES.items() for s in subjects}
MARKER = r"<image (\d+)>"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."


def build_prompt(question: str, options: list[str], question_type: str) -> str:
    if question_type == "multiple-choice":
        block = "".join(f"({chr(65 + i)}) {o}\n" for i, o in enumerate(options))
        return f"{question}\n\n{block}\n\n{MC_INSTRUCTION}"
    return f"{question}\n\n{OPEN_INSTRUCTION}"


def _gold(answer: str, where: str) -> list[str]:
    text = answer.strip()
    if text.startswith("[") and text.endswith("]"):
        return [str(a) for a in hub.literal_list(text, where, "answer")]
    return [text]


def _row_item(row: dict, where: str, root: str) -> dict:
    rid = hub.field(row, "id", str, where)
    question = hub.field(row, "question", str, where)
    answer = hub.field(row, "answer", str, where)
    qtype = hub.field(row, "question_type", str, where)
    if qtype not in ("multiple-choice", "open"):
        raise BadSample("bad_field", f"{where}: field 'question_type' is {qtype!r}, not multiple-choice/open")
    options = [str(o) for o in hub.literal_list(hub.field(row, "options", (str, list), where), where, "options")]
    if qtype == "multiple-choice" and not options:
        raise BadSample("bad_field", f"{where}: a multiple-choice question without options")
    images = {n: hub.image_entry(row.get(f"image_{n}"), where, f"image_{n}") for n in range(1, 8)}
    text, ordered = hub.place_images(build_prompt(question, options, qtype), MARKER, images, where)
    m = re.match(r"(?:dev|validation|test)_(.+)_\d+$", rid)
    subject = m.group(1) if m else ""
    return item(
        id=rid,
        question=text,
        answer=answer,
        images=ordered,
        choices=options,
        category=subject,
        meta={"question_type": qtype, "gold": _gold(answer, where), "options": options},
        breakdown={
            "subject": subject,
            "discipline": DISCIPLINE_OF.get(subject, "other"),
            "question_type": qtype,
            "difficulty": str(row.get("topic_difficulty") or ""),
        },
        root=root,
        where=where,
    )


def load(path: str, split: str, skips: SkipCounter) -> list[dict]:
    rows = hub.rows(hub.split_sources(path, split), skips)
    return hub.collect(rows, skips, lambda src, where, row, n: _row_item(row, where, hub.root_of(src)))


# ---- MMMU's answer parsing (after eval_utils.py of MMMU-Benchmark/MMMU) ----


def parse_multi_choice(response: str, letters: list[str], index2ans: dict[str, str]) -> str | None:
    """The chosen letter, by MMMU's rules (None where the reference would guess at random)."""
    for ch in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(ch)
    response = " " + response + " "
    candidates = [c for c in letters if f"({c})" in response]
    bracketed, by_text = bool(candidates), False
    if not candidates:
        candidates = [c for c in letters if f" {c} " in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, a in index2ans.items() if a.lower() in response.lower()]
        by_text = bool(candidates)
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    if by_text:
        pos = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    elif bracketed:
        pos = [response.rfind(f"({c})") for c in candidates]
    else:
        pos = [response.rfind(f" {c} ") for c in candidates]
    return candidates[max(range(len(pos)), key=lambda i: (pos[i], -i))]


_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+)(?![eE][+-]?\d+)(?![,\d])")
_KEYS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def extract_numbers(text: str) -> list[str]:
    return _COMMAS.findall(text) + _SCIENTIFIC.findall(text) + _SIMPLE.findall(text)


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def normalize(text: str) -> list:
    """A number rounded to 2 decimals, else the lower-cased string (a single character padded
    by a space on either side, so that it only matches as a word)."""
    text = text.strip()
    x = _as_number(text)
    if x is not None:
        return [round(x, 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def parse_open(response: str) -> list:
    def key_tails(resp: str) -> list[str]:
        resp = resp.strip().strip(".").lower()
        parts = re.split(r"\.\s(?=[A-Z])|\n", resp)
        tails = []
        for i, part in enumerate(parts):
            keys = _KEYS + (("=",) if i == len(parts) - 1 else ())
            shortest = None
            for k in keys:
                if k in part:
                    tail = part.split(k)[-1].strip()
                    if shortest is None or len(tail) < len(shortest):
                        shortest = tail
            if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
                tails.append(shortest)
        return tails or [resp]

    tails = key_tails(response)
    preds = list(tails)
    for t in tails:
        preds.extend(extract_numbers(t))
    out = []
    for p in preds:
        for n in normalize(p):
            if n not in out:
                out.append(n)
    return out


def eval_open(gold: list[str], preds: list) -> bool:
    norm = [n for g in gold for n in normalize(g)]
    for p in preds:
        if isinstance(p, str):
            if any(isinstance(g, str) and g in p for g in norm):
                return True
        elif p in norm:
            return True
    return False


def score(it: dict, response: str) -> Score:
    meta = it["meta"]
    text = after_thinking(response)
    boxed = last_boxed(text)
    if meta["question_type"] == "multiple-choice":
        options = meta["options"]
        letters = [chr(65 + i) for i in range(len(options))]
        index2ans = dict(zip(letters, options))
        pred = parse_multi_choice(boxed, letters, index2ans) if boxed else None
        if pred is None:
            pred = parse_multi_choice(text, letters, index2ans)
        if pred is None:
            return Score(0.0, None, "no_answer")
        return Score(float(pred in meta["gold"]), pred)
    preds = parse_open(boxed if boxed else text)
    return Score(float(eval_open(meta["gold"], preds)), str(preds[0]) if preds else None)


BENCHMARK = register(
    Benchmark(
        name="mmmu",
        splits=("validation", "dev"),
        default_split="validation",
        load=load,
        score=score,
        description="MMMU (MMMU/MMMU): 30 subjects, multiple-choice and open questions, interleaved images",
    )
)
