"""AIME 2024: 30 problems with integer answers 0–999, text only.

**Layouts read** (either publisher's, one split ``train``):

* ``HuggingFaceH4/aime_2024``: ``data/train-00000-of-00001.parquet`` with ``id`` int64,
  ``problem`` str, ``solution`` str, ``answer`` str, ``url`` str, ``year`` str;
* ``Maxwell-Jia/AIME_2024``: a parquet file (``aime_2024_problems.parquet``) with ``ID`` str
  (``2024-I-1``), ``Problem`` str, ``Solution`` str, ``Answer`` int64.

The columns decide which (a row with neither ``problem`` nor ``Problem`` is a counted
``missing_field``). ``--data`` may also be the parquet file itself.

**Prompt**: the problem, then "Please reason step by step, and put your final answer within
\\boxed{}." (the instruction DeepSeek-R1 and QwQ were evaluated with; AIME has no reference
harness of its own).

**Scoring**: on the text after ``</think>``: the last ``\\boxed{}``, else "the answer is ...",
else the last line (our verifier's :func:`~r1v2_jax.rewards.verifier.extract_answer`); LaTeX
wrappers, ``$``, degree signs and thousands commas dropped, the part after a last ``=``
kept; it must then be an integer (leading zeros allowed: ``073`` is 73; ``73.0`` counts as
73); correct iff equal to the gold integer.

Breakdown: ``part`` (``I`` / ``II``, where the id says).
"""

from __future__ import annotations

import re

from r1v2_jax.benchmarks import hub
from r1v2_jax.benchmarks.base import Benchmark, Score, item, register
from r1v2_jax.data.formats import BadSample, SkipCounter
from r1v2_jax.rewards.verifier import _untex, extract_answer

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def _row_item(row: dict, where: str, n: int) -> dict:
    if "problem" in row:
        problem = hub.field(row, "problem", str, where)
        answer = hub.field(row, "answer", (str, int), where)
        rid = row.get("id", n)
        url = str(row.get("url") or "")
    elif "Problem" in row:
        problem = hub.field(row, "Problem", str, where)
        answer = hub.field(row, "Answer", (str, int), where)
        rid = row.get("ID", n)
        url = str(rid)
    else:
        raise BadSample("missing_field", f"{where}: neither 'problem' (HuggingFaceH4) nor 'Problem' (Maxwell-Jia)")
    gold = to_int(str(answer))
    if gold is None:
        raise BadSample("bad_field", f"{where}: answer {answer!r} is not an integer")
    m = re.search(r"(?:AIME_|-)(II|I)(?:_|-|/|$)", url)
    return item(
        id=str(rid),
        question=f"{problem}\n{INSTRUCTION}",
        answer=str(gold),
        breakdown={"part": m.group(1) if m else ""},
        where=where,
    )


def load(path: str, split: str, skips: SkipCounter) -> list[dict]:
    rows = hub.rows(hub.split_sources(path, split), skips)
    return hub.collect(rows, skips, lambda src, where, row, n: _row_item(row, where, n))


def to_int(text: str) -> int | None:
    t = _untex(text).replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    t = t.split("=")[-1].strip().rstrip(".").strip()
    t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", t)
    m = re.fullmatch(r"[-+]?\d+(?:\.0*)?", t)
    return int(float(t)) if m else None


def score(it: dict, response: str) -> Score:
    raw = extract_answer(response)
    if not raw:
        return Score(0.0, None, "no_answer")
    got = to_int(raw)
    if got is None:
        return Score(0.0, raw, "not_an_integer")
    return Score(float(got == int(it["answer"])), str(got))


BENCHMARK = register(
    Benchmark(
        name="aime24",
        splits=("train",),
        default_split="train",
        load=load,
        score=score,
        description="AIME 2024 (HuggingFaceH4/aime_2024 or Maxwell-Jia/AIME_2024): 30 integer-answer problems",
    )
)
