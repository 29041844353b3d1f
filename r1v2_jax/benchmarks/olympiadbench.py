"""OlympiadBench (``Hothan/OlympiadBench`` on the Hub): the open-ended (``OE``) maths and
physics subsets, multimodal (``MM``) and text-only (``TO``). Theorem-proving (``TP``) subsets
need human grading and are left out (counted as ``theorem_proving``).

**Layout read**: one config per subset, ``OE_MM_maths_en_COMP``, ``OE_TO_physics_en_COMP``,
``OE_MM_maths_zh_CEE``, ... each with one split ``train``; any parquet files (or
``save_to_disk`` folders) under ``--data`` whose path names a subset are read, e.g.
``OlympiadBench/OE_MM_maths_en_COMP/*.parquet``. A file whose path names no subset is read
too; its rows are placed by their own fields (``question_type``, ``modality``, ``subject``,
``language``).

**Splits** (ours; the paper does not say which subsets it reports): ``oe_en`` (default: the
four English open-ended subsets, maths and physics, multimodal and text-only), ``oe_all``
(all ten open-ended subsets, English and Chinese), ``oe_mm_en``, ``oe_to_en``, and each
subset's own name.

**Schema** (per row): ``id`` int, ``question`` str (``<image_N>`` markers), ``solution`` list
of str, ``final_answer`` list of str (the reference judges against ``final_answer[0]``,
which holds several answers joined by commas when ``is_multiple_answer``), ``context`` str
or null (physics: the shared setting), ``image_1`` … ``image_9`` Image or null,
``modality`` str, ``difficulty`` str, ``is_multiple_answer`` bool, ``unit`` str or null,
``answer_type`` str (``Numerical`` / ``Expression`` / ``Equation`` / ``Interval`` /
``Tuple``, comma-joined per answer), ``error`` str or null (the numeric tolerance; one per
answer when comma-joined), ``question_type`` str, ``subfield`` str, ``subject`` str
(``Math`` / ``Physics``), ``language`` str (``English`` / ``Chinese``).

**Prompt** (the reference's ``Evaluator.make_prompt``): "The following is an open-ended
problem from an International {Math|Physics} competition. {The answer of The problem should
be ...}Please calculate the answer ... Please end your solution with "So the final answer is
\\boxed{answer}." and give the result explicitly[, note that the unit ...]." then a newline and
the question (physics: the context first). Chinese subsets get the reference's Chinese prompt.

**Scoring** (``judge.py`` + ``math_judger.py``), on the text after ``</think>``: the part
after the last "So the final answer is" (所以最终答案是), else all of it; the contents of its
``\\boxed{}`` (all of them, joined by commas), else the ``$...$`` formulas of its last line,
else the text; the reference's symbol clean-up; equal strings; else both split at top-level
commas (``\\pm`` giving two answers), the same count, and every gold answer matched by a
distinct predicted one: intervals end by end, numbers within the row's tolerance (default
1e-8, times 1.01; a plain number also matches the gold times 100 or over 100), constant
expressions by value within the tolerance, other expressions and equations by math-verify
equivalence (the reference uses sympy's ``parse_latex``; :mod:`mathcheck`).

Breakdowns: ``subset``, ``subject``, ``modality``, ``subfield``, ``answer_type``.
"""

from __future__ import annotations

import os
import re

from r1v2_jax.benchmarks import hub, mathcheck
from r1v2_jax.benchmarks.base import Benchmark, Score, item, register
from r1v2_jax.data.formats import BadSample, SkipCounter
from r1v2_jax.rewards.verifier import after_thinking

SUBSET = re.compile(r"(OE|TP)_(MM|TO)_(maths|physics)_(en|zh)_(COMP|CEE)")
OE_SUBSETS = (
    "OE_MM_maths_en_COMP",
    "OE_MM_maths_zh_CEE",
    "OE_MM_maths_zh_COMP",
    "OE_MM_physics_en_COMP",
    "OE_MM_physics_zh_CEE",
    "OE_TO_maths_en_COMP",
    "OE_TO_maths_zh_CEE",
    "OE_TO_maths_zh_COMP",
    "OE_TO_physics_en_COMP",
    "OE_TO_physics_zh_CEE",
)
SPLITS = {
    "oe_en": tuple(s for s in OE_SUBSETS if "_en_" in s),
    "oe_all": OE_SUBSETS,
    "oe_mm_en": tuple(s for s in OE_SUBSETS if s.startswith("OE_MM") and "_en_" in s),
    "oe_to_en": tuple(s for s in OE_SUBSETS if s.startswith("OE_TO") and "_en_" in s),
    **{s: (s,) for s in OE_SUBSETS},
}
MARKER = r"<image_(\d+)>"
_TYPES_EN = {
    "Numerical": "a numerical value",
    "Expression": "an expression",
    "Equation": "an equation",
    "Interval": "an interval",
}
_TYPES_ZH = {"Numerical": "数值", "Expression": "表达式", "Equation": "方程", "Interval": "区间"}


def _one_type(t: str, zh: bool) -> str:
    for k in _TYPES_EN:
        if k in t:
            return (_TYPES_ZH if zh else _TYPES_EN)[k]
    raise BadSample("bad_field", f"field 'answer_type': unknown answer type {t!r}")


def _answer_type_text(answer_type: str, zh: bool, multiple: bool) -> str:
    if "Need_human_evaluate" in answer_type or "Tuple" in answer_type:
        return ""
    if not multiple:
        t = _one_type(answer_type, zh)
        return f"，答案类型为{t}" if zh else f"The answer of The problem should be {t}. "
    types = [_one_type(t, zh) for t in answer_type.split(",")]
    if len(set(types)) == 1:
        return (
            f"，题目有多个答案，答案类型均为{types[0]}"
            if zh
            else f"The problem has multiple answers, each of them should be {types[0]}. "
        )
    if zh:
        return f"，题目有多个答案，答案类型分别为{'、'.join(types)}"
    return f"The problem has multiple answers, with the answers in order being {', '.join(types)}. "


def build_prompt(row: dict, zh: bool, physics: bool) -> str:
    multiple = bool(row.get("is_multiple_answer"))
    type_text = _answer_type_text(str(row.get("answer_type") or ""), zh, multiple)
    unit = row.get("unit")
    if zh:
        subject = "物理" if physics else "数学"
        boxed = "\\boxed{用英文逗号连接的多个答案}" if multiple else "\\boxed{答案}"
        unit_text = ""
        if unit:
            boxed += "(单位)"
            unit_text = "，注意答案的单位不要放在\\boxed{}中"
        head = (
            f"以下是中国{subject}竞赛中的解答题{type_text}。请根据题目的要求和所提供的信息计算得出答案。"
            f"解答过程和结果中使用的变量和公式请使用LaTeX格式表示。请在最后以“所以最终答案是{boxed}。”显式给出结果{unit_text}。"
        )
    else:
        subject = "Physics" if physics else "Math"
        boxed = "\\boxed{multiple answers connected with commas}" if multiple else "\\boxed{answer}"
        unit_text = ""
        if unit:
            boxed += "(unit)"
            unit_text = ", note that the unit of the answer should not be included in \\boxed{}"
        head = (
            f"The following is an open-ended problem from an International {subject} competition. "
            f"{type_text}Please calculate the answer according to the given requirements and the information "
            "provided. Please use LaTeX format to represent the variables and formulas used in the solution "
            f'process and results. Please end your solution with "So the final answer is {boxed}." and give '
            f"the result explicitly{unit_text}."
        )
    body = row["question"]
    if physics and row.get("context"):
        body = f"{row['context']}\n{body}"
    return f"{head}\n{body}"


def _subset_of(src: str, row: dict) -> str:
    m = SUBSET.search(src)
    if m:
        return m.group(0)
    qt = str(row.get("question_type") or "")
    kind = "TP" if "proof" in qt.lower() or "proving" in qt.lower() else "OE"
    mm = "MM" if str(row.get("modality") or "").lower().startswith("multi") else "TO"
    subj = "physics" if str(row.get("subject") or "").lower().startswith("phys") else "maths"
    lang = "zh" if str(row.get("language") or "").lower().startswith("chin") else "en"
    return f"{kind}_{mm}_{subj}_{lang}_{'COMP' if lang == 'en' else 'CEE'}"


def _precisions(error, n: int, where: str) -> list[float]:
    if error is None or (isinstance(error, str) and not error.strip()):
        return [1e-8] * n
    try:
        if isinstance(error, (int, float)):
            return [float(error)] * n
        parts = [float(p) if p.strip() else 1e-8 for p in str(error).split(",")]
    except ValueError:
        raise BadSample("bad_field", f"{where}: field 'error' is not a tolerance: {error!r}") from None
    return parts if len(parts) > 1 else parts * n


def _row_item(row: dict, where: str, root: str, subset: str) -> dict:
    rid = hub.field(row, "id", (int, str), where)
    hub.field(row, "question", str, where)
    finals = hub.field(row, "final_answer", list, where)
    if not finals or not isinstance(finals[0], str) or not finals[0].strip():
        raise BadSample("missing_field", f"{where}: field 'final_answer' is empty")
    zh, physics = "_zh_" in subset, "_physics_" in subset
    images = {}
    for k, v in row.items():
        m = re.fullmatch(r"image_(\d+)", k)
        if m:
            images[int(m.group(1))] = hub.image_entry(v, where, k)
    text, ordered = hub.place_images(build_prompt(row, zh, physics), MARKER, images, where)
    answer_type = str(row.get("answer_type") or "")
    n_answers = len(split_by_comma(finals[0]))
    tol = [] if "Tuple" in answer_type else _precisions(row.get("error"), n_answers, where)
    return item(
        id=f"{subset}/{rid}",
        question=text,
        answer=finals[0],
        images=ordered,
        category=subset,
        meta={"precision": tol, "chinese": zh, "answers": finals},
        breakdown={
            "subset": subset,
            "subject": str(row.get("subject") or ""),
            "modality": str(row.get("modality") or ""),
            "subfield": str(row.get("subfield") or ""),
            "answer_type": answer_type,
        },
        root=root,
        where=where,
    )


def load(path: str, split: str, skips: SkipCounter) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"olympiadbench: unknown split {split!r}; known: {', '.join(SPLITS)}")
    wanted = set(SPLITS[split])

    def make(src, where, row, n):
        subset = _subset_of(os.path.relpath(src, path) if os.path.isdir(path) else src, row)
        if subset.startswith("TP_"):
            raise BadSample("theorem_proving", f"{where}: theorem-proving problems need human grading")
        return _row_item(row, where, hub.root_of(src), subset) if subset in wanted else None

    return hub.collect(hub.rows(hub.split_sources(path, None), skips), skips, make)


# ---- the reference judge (after inference/code/math_judger.py of OpenBMB/OlympiadBench) ----

_SIGNALS = {
    "\\left": "",
    "\\right": "",
    "∶": ":",
    "，": ",",
    "$": "",
    "\\approx": "=",
    "\\simeq": "=",
    "\\sim": "=",
    "^\\prime": "'",
    "^{\\prime}": "'",
    "^\\circ": "",
    "%": "",
}


def split_by_comma(expr: str) -> list[str]:
    depth, out, start = 0, [], 0
    for i, ch in enumerate(expr):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(expr[start:i].strip())
            start = i + 1
    if start < len(expr):
        out.append(expr[start:].strip())
    return out


def boxed_contents(text: str) -> str | None:
    """All ``\\boxed{...}`` contents joined by commas ("" when none; None if a box does not close)."""
    out = ""
    for m in re.finditer(r"\\boxed\{", text):
        i, depth = m.end(), 1
        while depth and i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:
            return None
        out += text[m.end() : i - 1] + ","
    return out


def _answer_part(text: str) -> str | None:
    got = boxed_contents(text)
    if got is None:
        return None
    if not got:
        last = text.strip().split("\n")[-1]
        formulas = re.findall(r"\$(.*?)\$", last)
        got = "".join(f + "," for f in formulas) if formulas else text
    return got


def clean(expr: str) -> str:
    if "\\in " in expr:
        expr = expr.split("\\in ")[1]
    for a, b in _SIGNALS.items():
        expr = expr.replace(a, b)
    expr = expr.strip("\n$,.:;^_=+`!@#$%^&*~，。")
    return re.sub(r"\\(?:mathrm|mathbf)\{~?([^}]*)\}", r"\1", expr)


def _pm(items: list[str]) -> list[str]:
    out = []
    for e in items:
        out.extend([e.replace("\\pm", "+"), e.replace("\\pm", "-")] if "\\pm" in e else [e])
    return out


def _rhs(e: str) -> str:
    return e.split("=")[1].strip() if "=" in e else e.strip()


def _numerical_equal(gold: str, pred: str, tol: float) -> bool:
    g, p = float(gold), float(pred)
    return any(abs(x - p) <= tol * 1.01 for x in (g / 100, g, g * 100))


def _interval_equal(gold: str, pred: str) -> bool:
    gs, ps = gold.split("\\cup"), pred.split("\\cup")
    if len(gs) != len(ps):
        return False
    for a, b in zip(gs, ps):
        a, b = a.strip(), b.strip()
        if a[:1] != b[:1] or a[-1:] != b[-1:]:
            return False
        ea, eb = a.strip("[]()").split(","), b.strip("[]()").split(",")
        if len(ea) != len(eb) or not all(_expression_equal(x, y, 1e-8) for x, y in zip(ea, eb)):
            return False
    return True


def _expression_equal(gold: str, pred: str, tol: float) -> bool:
    g, p = _rhs(gold), _rhs(pred)
    if g == p:
        return True
    gv, pv = mathcheck.value(g), mathcheck.value(p)
    if gv is not None and pv is not None:
        return abs(gv - pv) <= tol * 1.01
    if (gv is None) != (pv is None):
        return False  # a number against a symbolic (or unreadable) expression
    return mathcheck.equivalent(g, p)


def is_equal(gold: str, pred: str, tol: float) -> bool:
    if gold == pred and gold:
        return True
    if gold[:1] in "([" and gold[-1:] in ")]" and pred[:1] in "([" and pred[-1:] in ")]":
        return _interval_equal(gold, pred)
    try:
        if _numerical_equal(gold, pred, tol):
            return True
    except ValueError:
        pass
    if _expression_equal(gold, pred, tol) and not ("=" in gold and "=" in pred):
        return True
    return "=" in gold and "=" in pred and mathcheck.equivalent(gold, pred)


def judge(gold: str, pred: str, precision: list[float]) -> bool:
    g, p = _answer_part(gold), _answer_part(pred)
    if g is None or p is None:
        return False
    g, p = clean(g), clean(p)
    if g == p:
        return True
    g = re.sub(r"[\u4e00-\u9fff]+", "", g)
    p = re.sub(r"[\u4e00-\u9fff]+", "", p)
    gs, ps = _pm(split_by_comma(g)), _pm(split_by_comma(p))
    if len(gs) != len(ps):
        return False
    tols = list(precision) if len(precision) == len(gs) else [precision[0] if precision else 1e-8] * len(gs)
    for a, tol in zip(gs, tols):
        match = next((b for b in ps if is_equal(a, b, tol)), None)
        if match is None:
            return False
        ps.remove(match)
    return True


def extract(response: str, chinese: bool) -> str:
    text = after_thinking(response)
    found = re.findall("所以最终答案是(.*)" if chinese else "So the final answer is (.*)", text)
    return found[-1].strip() if found else text


def score(it: dict, response: str) -> Score:
    pred = extract(response, it["meta"]["chinese"])
    if not pred.strip():
        return Score(0.0, None, "no_answer")
    part = _answer_part(pred)
    shown = clean(part) if part is not None else None
    return Score(float(judge(it["answer"], pred, it["meta"]["precision"])), shown)


BENCHMARK = register(
    Benchmark(
        name="olympiadbench",
        splits=tuple(SPLITS),
        default_split="oe_en",
        load=load,
        score=score,
        description="OlympiadBench (Hothan/OlympiadBench): open-ended olympiad maths and physics, with and without images",
    )
)
