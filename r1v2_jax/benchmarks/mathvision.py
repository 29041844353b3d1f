"""MATH-Vision (``MathLLMs/MathVision`` on the Hub), splits ``test`` (3040, default) and
``testmini`` (304).

**Layout read**: ``data/test-00000-of-00001-*.parquet``, ``data/testmini-00000-of-00001-*.parquet``
(or a ``save_to_disk`` folder).

**Schema** (per row): ``id`` str, ``question`` str (with an ``<image1>`` marker), ``options``
list of str (5 entries, or empty for free-form answers), ``image`` str (path in the
publisher's ``images/`` folder), ``decoded_image`` Image (``{"bytes", "path"}``), ``answer``
str (a letter A–E for multiple choice, else the answer, often LaTeX), ``solution`` str or
null, ``level`` int64 (1–5), ``subject`` str (16 subjects).

**Prompt** (the reference's chain-of-thought prompt, ``models/Qwen-VL.py``): 'Please solve
the problem step by step and put your answer in one "\\boxed{}". If it is a multiple choice
question, only one letter is allowed in the "\\boxed{}".' then the question and, unless the
options are just the letters A–E (their text is in the image), ``(A) text`` lines. The
``<imageN>`` marker becomes the ``<image>`` placeholder of ``decoded_image`` (or of the
``image`` path under the data root).

**Scoring** (``evaluation/evaluate.py`` + ``utils.py``: ``find_math_answer``, ``is_equal``),
on the text after ``</think>``: a response ending " B." / " (B)." or starting "B\\n" reads B;
without a box, the text after the last "the (final / correct) answer is / should be" up to
the line or sentence end; with boxes, the last one (we take its balanced content, where the
reference's greedy regex runs to the last ``}``). Then the reference's clean-up (lower case,
the part after the last ``=`` / ``\\approx``, spaces, ``\\text``, ``\\left/\\right``, degrees,
dollars, percent, a few units, ``a/b`` -> ``\\frac{a}{b}``). Correct iff it equals the gold
answer, or the gold option's text, as a string or as numbers rounded to 2 decimals (also
element by element in tuples); the reference evaluates LaTeX with latex2sympy, we with
math-verify (:mod:`mathcheck`).

Breakdowns: ``subject``, ``level``.
"""

from __future__ import annotations

import re

from r1v2_jax.benchmarks import hub, mathcheck
from r1v2_jax.benchmarks.base import Benchmark, Score, item, register
from r1v2_jax.data.formats import BadSample, SkipCounter
from r1v2_jax.rewards.verifier import after_thinking, last_boxed

MARKER = r"<image(\d+)>"
INSTRUCTION = (
    'Please solve the problem step by step and put your answer in one "\\boxed{}". '
    'If it is a multiple choice question, only one letter is allowed in the "\\boxed{}".\n'
)


def build_prompt(question: str, options: list[str]) -> str:
    block = ""
    if options and "".join(options) != "ABCDE":
        block = "".join(f"({chr(65 + i)}) {o}\n" for i, o in enumerate(options))
    return f"{INSTRUCTION}{question}\n{block}"


def _row_item(row: dict, where: str, root: str) -> dict:
    rid = str(hub.field(row, "id", (str, int), where))
    question = hub.field(row, "question", str, where)
    answer = hub.field(row, "answer", str, where)
    options = [str(o) for o in (hub.field(row, "options", list, where, optional=True) or [])]
    if options and not (len(answer.strip()) == 1 and 0 <= ord(answer.strip()) - 65 < len(options)):
        raise BadSample("bad_field", f"{where}: answer {answer!r} is not the letter of one of {len(options)} options")
    image = hub.image_entry(row.get("decoded_image"), where, "decoded_image") or hub.image_entry(
        row.get("image"), where, "image"
    )
    images = {1: image} if image is not None else {}
    text, ordered = hub.place_images(build_prompt(question, options), MARKER, images, where)
    level = row.get("level")
    return item(
        id=rid,
        question=text,
        answer=answer,
        images=ordered,
        choices=options,
        category=str(row.get("subject") or ""),
        meta={"options": options},
        breakdown={"subject": str(row.get("subject") or ""), "level": "" if level is None else str(level)},
        root=root,
        where=where,
    )


def load(path: str, split: str, skips: SkipCounter) -> list[dict]:
    rows = hub.rows(hub.split_sources(path, split), skips)
    return hub.collect(rows, skips, lambda src, where, row, n: _row_item(row, where, hub.root_of(src)))


_FLAGS = ("the final answer is", "the answer is", "the correct answer is", "the answer should be")


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _strip(ans: str) -> str:
    """The reference's ``find_math_answer`` clean-up after the box is read."""
    ans = ans.lower().replace("{}", "")
    if "}" in ans and ("{" not in ans or ans.find("}") < ans.find("{")):
        ans = ans.split("}")[0]
    ans = ans.split("=")[-1].split("\\approx")[-1]
    for a, b in (
        (" ", ""),
        ("\\,", ""),
        ("∞", "\\infty"),
        ("+\\infty", "\\infty"),
        ("\\\\", "\\"),
        ("\n", ""),
        ("\\text", ""),
        ("\\mbox", ""),
        ("bmatrix", "pmatrix"),
        ("\\left", ""),
        ("\\right", ""),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("{m}^3", ""),
        ("m^3", ""),
        ("{units}", ""),
        ("units", ""),
        ("{km}", ""),
        ("km", ""),
        ("\\!", ""),
        ("tfrac", "frac"),
        ("dfrac", "frac"),
        ("\\$", ""),
        ("$", ""),
        ("\\%", ""),
        ("%", ""),
    ):
        ans = ans.replace(a, b)
    if ans.startswith("."):
        ans = "0" + ans
    ans = ans.replace("{.", "{0.")
    m = re.fullmatch(r"(-?\d+)/(\d+)", ans)
    if m:
        ans = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    for a in ("(a)", "(b)", "(c)", "(d)", "(e)", "{a}", "{b}", "{c}", "{d}", "{e}"):
        ans = ans.replace(a, a[1])
    return ans.rstrip(".").lstrip(":").strip()


def extract(response: str) -> str:
    ans = after_thinking(response).strip()
    for c in "ABCDE":
        if (
            ans.endswith(f" {c}.")
            or ans.endswith(f" ({c}).")
            or ans.startswith(f"{c}\n")
            or ans.startswith(f"({c})\n")
            or ans.startswith(f"({c}) {c}\n")
        ):
            ans = c
    tail = ans.split("is ")[-1].rstrip(".")
    if _is_number(tail):
        ans = tail
    boxed = last_boxed(ans)
    if boxed is not None:
        return _strip(boxed)
    for flag in _FLAGS:
        for f in (flag, flag.replace("the", "The")):
            if f in ans:
                ans = ans.split(f)[-1].strip().split("\n")[0].split(". ")[0]
    return _strip(ans)


def _num_equal(a: str, b: str) -> bool:
    x, y = mathcheck.value(a), mathcheck.value(b)
    return x is not None and y is not None and round(x, 2) == round(y, 2)


def is_equal(gold: str, pred: str) -> bool:
    gold, pred = gold.lower().strip(), pred.lower().strip()
    if not gold.replace(" ", "") or not pred.replace(" ", ""):
        return False
    if gold == pred:
        return True
    bracket = gold[:1] + gold[-1:]
    if bracket in ("()", "[]") and pred[:1] + pred[-1:] == bracket and "," in gold:
        g, p = gold[1:-1].split(","), pred[1:-1].split(",")
        return len(g) == len(p) and all(x.strip() == y.strip() or _num_equal(x, y) for x, y in zip(g, p))
    return _num_equal(gold, pred)


def score(it: dict, response: str) -> Score:
    pred = extract(response)
    if not pred:
        return Score(0.0, None, "no_answer")
    gold = it["answer"].strip()
    options = it["meta"]["options"]
    value = options[ord(gold) - 65] if options else ""
    return Score(float(is_equal(gold, pred) or is_equal(value, pred)), pred)


BENCHMARK = register(
    Benchmark(
        name="mathvision",
        splits=("test", "testmini"),
        default_split="test",
        load=load,
        score=score,
        description="MATH-Vision (MathLLMs/MathVision): competition maths with images, 16 subjects, 5 levels",
    )
)
