"""The published benchmarks: fixtures written in each data set's Hub schema (parquet files with
its column names and types, images embedded as the Image feature's bytes, its folder and file
names), tables of responses with hand-computed scores (the extraction edge cases of each
reference evaluation), the resumable runner, ``r1v2 score``, and ``r1v2 eval --benchmark``
end to end on a tiny model."""

import io
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import r1v2_jax
from r1v2_jax.benchmarks import base, hub, registry
from r1v2_jax.cli import main
from r1v2_jax.data.formats import SkipCounter
from r1v2_jax.data.tokenizer import tiny_tokenizer
from r1v2_jax.model.config import model_config
from r1v2_jax.train import benchmark_eval as B

IMG = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image feature in parquet


def png(color: int, size=(24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), color, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def img(color: int, name: str) -> dict:
    return {"bytes": png(color), "path": name}


def write(path, rows: list[dict], schema: pa.Schema) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def load(name, path, split=None):
    b = registry.get(name)
    skips = SkipCounter()
    return b.load(str(path), split or b.default_split, skips), skips


def score(name, it, response):
    return registry.get(name).score(it, response)


# ---------------------------------------------------------------- MMMU

MMMU_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("options", pa.string()),
        ("explanation", pa.string()),
        *[(f"image_{i}", IMG) for i in range(1, 8)],
        ("img_type", pa.string()),
        ("answer", pa.string()),
        ("topic_difficulty", pa.string()),
        ("question_type", pa.string()),
        ("subfield", pa.string()),
    ]
)


def mmmu_row(rid, question, options, answer, qtype, images=None, difficulty="Easy"):
    row = {
        "id": rid,
        "question": question,
        "options": options,
        "explanation": "",
        "img_type": "['Diagrams']",
        "answer": answer,
        "topic_difficulty": difficulty,
        "question_type": qtype,
        "subfield": "Managerial Accounting",
    }
    for i in range(1, 8):
        row[f"image_{i}"] = (images or {}).get(i)
    return row


@pytest.fixture(scope="module")
def mmmu_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("MMMU")
    acc = [
        mmmu_row(
            "validation_Accounting_1",
            "Which figure is shown in <image 1>?",
            "['<image 2>', '<image 3>', 'neither', 'both']",
            "B",
            "multiple-choice",
            {1: img(10, "1.png"), 2: img(20, "2.png"), 3: img(30, "3.png")},
        ),
        mmmu_row("validation_Accounting_2", "What is the ratio?", "[]", "1.5", "open", difficulty="Hard"),
        mmmu_row(
            "validation_Accounting_3",
            "What is in <image 4>?",
            "['a', 'b']",
            "A",
            "multiple-choice",
            {1: img(5, "x.png")},
        ),
        mmmu_row("validation_Accounting_4", "How much?", "['$6', '$7', '$8', '$9']", "B", "multiple-choice"),
        mmmu_row("validation_Accounting_5", "Which city?", "[]", "Paris", "open"),
        mmmu_row("validation_Accounting_6", "Which number?", "[]", "['3.43', '3.429']", "open"),
    ]
    write(str(root / "Accounting" / "validation-00000-of-00001.parquet"), acc, MMMU_SCHEMA)
    art = [
        mmmu_row(
            "validation_Art_Theory_1",
            "Who painted it?",
            "['Monet', 'Manet']",
            "A",
            "multiple-choice",
            {1: img(99, "a.png")},
        )
    ]
    write(str(root / "Art_Theory" / "validation-00000-of-00001.parquet"), art, MMMU_SCHEMA)
    dev = [mmmu_row("dev_Art_Theory_1", "dev question", "['x', 'y']", "A", "multiple-choice")]
    write(str(root / "Art_Theory" / "dev-00000-of-00001.parquet"), dev, MMMU_SCHEMA)
    return root


def test_mmmu_reads_the_published_layout_and_maps_images_in_order(mmmu_dir):
    items, skips = load("mmmu", mmmu_dir)
    by_id = {it["id"]: it for it in items}
    assert sorted(by_id) == [
        "validation_Accounting_1",
        "validation_Accounting_2",
        "validation_Accounting_4",
        "validation_Accounting_5",
        "validation_Accounting_6",
        "validation_Art_Theory_1",
    ]  # the dev file is another split; Accounting_3 names an image it lacks
    assert skips.as_dict() == {"missing_image": 1}
    q = by_id["validation_Accounting_1"]
    assert q["question"] == (
        "Which figure is shown in <image>?\n\n(A) <image>\n(B) <image>\n(C) neither\n(D) both\n\n\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert [im["bytes"] for im in q["images"]] == [png(10), png(20), png(30)]
    assert q["breakdown"] == {
        "subject": "Accounting",
        "discipline": "Business",
        "question_type": "multiple-choice",
        "difficulty": "Easy",
    }
    art = by_id["validation_Art_Theory_1"]  # an image no marker names comes first
    assert art["question"].startswith("<image>\nWho painted it?") and len(art["images"]) == 1
    assert by_id["validation_Accounting_2"]["question"].endswith("Answer the question using a single word or phrase.")
    dev, _ = load("mmmu", mmmu_dir, "dev")
    assert [it["id"] for it in dev] == ["dev_Art_Theory_1"]


@pytest.mark.parametrize(
    "rid,response,correct",
    [
        ("validation_Accounting_4", "(B)", 1),
        ("validation_Accounting_4", "The answer is B.", 1),
        ("validation_Accounting_4", "I think (A) is wrong, the answer is (B)", 1),  # the last bracketed one
        ("validation_Accounting_4", "A or B", 1),  # two bare letters: the one that occurs last
        ("validation_Accounting_4", "It costs $7 in total for everything here", 1),  # > 5 words: option text
        ("validation_Accounting_4", "$7", 0),  # option text only counts in responses over 5 words
        ("validation_Accounting_4", "<think>(A) surely</think>\n\\boxed{B}", 1),
        ("validation_Accounting_4", "C", 0),
        ("validation_Accounting_4", "no idea", 0),  # the reference guesses at random here; we score 0
        ("validation_Accounting_2", "the answer is 1.50", 1),  # numbers compared rounded to 2 decimals
        ("validation_Accounting_2", "The result is 1.5 meters", 1),
        ("validation_Accounting_2", "x = 3/2", 0),  # fractions are not evaluated by the reference
        ("validation_Accounting_2", "It is 1,500", 0),
        ("validation_Accounting_5", "It is Paris.", 1),
        ("validation_Accounting_5", "parisian", 1),  # strings: the gold contained in the prediction
        ("validation_Accounting_5", "London", 0),
        ("validation_Accounting_6", "so it is 3.429", 1),  # one of several accepted answers
    ],
)
def test_mmmu_scores(mmmu_dir, rid, response, correct):
    items, _ = load("mmmu", mmmu_dir)
    it = next(i for i in items if i["id"] == rid)
    assert score("mmmu", it, response).correct == correct


def test_mmmu_no_answer_is_counted():
    from r1v2_jax.benchmarks import mmmu

    assert mmmu.parse_multi_choice(" no idea ", ["A", "B"], {"A": "x", "B": "y"}) is None


# ---------------------------------------------------------------- MathVista

MATHVISTA_META = pa.struct(
    [
        ("category", pa.string()),
        ("context", pa.string()),
        ("grade", pa.string()),
        ("img_height", pa.int64()),
        ("img_width", pa.int64()),
        ("language", pa.string()),
        ("skills", pa.list_(pa.string())),
        ("source", pa.string()),
        ("split", pa.string()),
        ("task", pa.string()),
    ]
)
MATHVISTA_SCHEMA = pa.schema(
    [
        ("pid", pa.string()),
        ("question", pa.string()),
        ("image", pa.string()),
        ("decoded_image", IMG),
        ("choices", pa.list_(pa.string())),
        ("unit", pa.string()),
        ("precision", pa.float64()),
        ("answer", pa.string()),
        ("question_type", pa.string()),
        ("answer_type", pa.string()),
        ("metadata", MATHVISTA_META),
        ("query", pa.string()),
    ]
)


def mathvista_row(pid, answer, qtype, atype, choices=None, unit=None, precision=None, skills=("arithmetic reasoning",)):
    q = f"Question {pid}?"
    return {
        "pid": pid,
        "question": q,
        "image": f"images/{pid}.jpg",
        "decoded_image": img(int(pid) * 40, f"{pid}.jpg"),
        "choices": choices,
        "unit": unit,
        "precision": precision,
        "answer": answer,
        "question_type": qtype,
        "answer_type": atype,
        "metadata": {
            "category": "math-targeted-vqa",
            "context": "synthetic scene",
            "grade": "elementary school",
            "img_height": 20,
            "img_width": 24,
            "language": "english",
            "skills": list(skills),
            "source": "CLEVR-Math",
            "split": "testmini",
            "task": "math word problem",
        },
        "query": f"Hint: Please answer the question and provide the final answer at the end.\n{q}",
    }


@pytest.fixture(scope="module")
def mathvista_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("MathVista")
    rows = [
        mathvista_row("1", "5", "multi_choice", "text", choices=["3", "5", "7", "9"]),
        mathvista_row(
            "2", "12", "free_form", "integer", unit="cm", skills=("geometry reasoning", "arithmetic reasoning")
        ),
        mathvista_row("3", "1.5", "free_form", "float", precision=1.0),
    ]
    write(str(root / "data" / "testmini-00000-of-00001-725687bf7a18d64b.parquet"), rows, MATHVISTA_SCHEMA)
    return root


def test_mathvista_reads_testmini_with_its_query_and_image(mathvista_dir):
    items, skips = load("mathvista", mathvista_dir)
    assert [it["id"] for it in items] == ["1", "2", "3"] and skips.total == 0
    assert (
        items[0]["question"]
        == "<image>\nHint: Please answer the question and provide the final answer at the end.\nQuestion 1?"
    )
    assert items[0]["images"] == [{"bytes": png(40)}]
    assert items[1]["breakdown"]["skills"] == ["geometry reasoning", "arithmetic reasoning"]


def test_mathvista_reads_a_save_to_disk_folder(mathvista_dir, tmp_path):
    table = pq.read_table(next((mathvista_dir / "data").glob("*.parquet")))
    (tmp_path / "testmini").mkdir()
    with pa.OSFile(str(tmp_path / "testmini" / "data-00000-of-00001.arrow"), "wb") as f:
        with pa.ipc.new_stream(f, table.schema) as w:
            w.write_table(table)
    items, _ = load("mathvista", tmp_path)
    assert [it["id"] for it in items] == ["1", "2", "3"]


@pytest.mark.parametrize(
    "pid,response,correct",
    [
        ("1", "\\boxed{B}", 1),  # a letter is its choice's text
        ("1", "5", 1),  # a response that is one of the choices
        ("1", "\\boxed{(b)}", 1),
        ("1", "The answer is (C) 7", 0),
        ("1", "\\boxed{6}", 0),  # no letter: the most similar choice (Levenshtein; a tie: the first, "3")
        ("2", "\\boxed{12}", 1),
        ("2", "\\boxed{12 cm}", 1),  # the unit is dropped
        ("2", "\\boxed{12.0}", 1),  # integer answers: int(float(x))
        ("2", "The answer is 13", 0),
        ("2", "\\boxed{twelve}", 0),
        ("3", "\\boxed{1.50}", 1),  # float answers rounded to the row's precision (1)
        ("3", "\\boxed{1.46}", 1),
        ("3", "\\boxed{1.44}", 0),
        ("3", "The side is 1.5 cm^2", 1),  # the last number that is not an exponent
    ],
)
def test_mathvista_scores(mathvista_dir, pid, response, correct):
    items, _ = load("mathvista", mathvista_dir)
    it = next(i for i in items if i["id"] == pid)
    assert score("mathvista", it, response).correct == correct


def test_mathvista_not_a_number_is_counted(mathvista_dir):
    items, _ = load("mathvista", mathvista_dir)
    assert score("mathvista", items[1], "\\boxed{twelve}").detail == "not_a_number"


# ---------------------------------------------------------------- MATH-Vision

MATHVISION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("options", pa.list_(pa.string())),
        ("image", pa.string()),
        ("decoded_image", IMG),
        ("answer", pa.string()),
        ("solution", pa.string()),
        ("level", pa.int64()),
        ("subject", pa.string()),
    ]
)


def mathvision_row(rid, question, options, answer, level=1, subject="counting"):
    return {
        "id": rid,
        "question": question,
        "options": options,
        "image": f"images/{rid}.jpg",
        "decoded_image": img(int(rid) * 50, f"{rid}.jpg"),
        "answer": answer,
        "solution": None,
        "level": level,
        "subject": subject,
    }


@pytest.fixture(scope="module")
def mathvision_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("MathVision")
    rows = [
        mathvision_row("1", "How many dots?\n<image1>", ["1", "2", "3", "4", "5"], "C"),
        mathvision_row("2", "<image1>\nWhat fraction is shaded?", [], "\\frac{1}{2}", 3, "arithmetic"),
        mathvision_row("3", "Which picture?\n<image1>", ["A", "B", "C", "D", "E"], "D", 2, "logic"),
    ]
    write(str(root / "data" / "test-00000-of-00001-3532b8d3f1b4047a.parquet"), rows, MATHVISION_SCHEMA)
    write(str(root / "data" / "testmini-00000-of-00001-f8ff70fcb2f29b1d.parquet"), rows[:1], MATHVISION_SCHEMA)
    return root


def test_mathvision_prompts_as_the_reference(mathvision_dir):
    items, _ = load("mathvision", mathvision_dir)
    assert [it["id"] for it in items] == ["1", "2", "3"]
    head = (
        'Please solve the problem step by step and put your answer in one "\\boxed{}". '
        'If it is a multiple choice question, only one letter is allowed in the "\\boxed{}".\n'
    )
    assert items[0]["question"] == head + "How many dots?\n<image>\n(A) 1\n(B) 2\n(C) 3\n(D) 4\n(E) 5\n"
    assert items[2]["question"] == head + "Which picture?\n<image>\n"  # options A..E: their text is in the image
    assert items[1]["images"] == [{"bytes": png(100)}]
    assert items[1]["breakdown"] == {"subject": "arithmetic", "level": "3"}
    mini, _ = load("mathvision", mathvision_dir, "testmini")
    assert [it["id"] for it in mini] == ["1"]


@pytest.mark.parametrize(
    "rid,response,correct",
    [
        ("1", "\\boxed{C}", 1),
        ("1", "\\boxed{3}", 1),  # the gold option's text
        ("1", "Counting them, so the answer is (C).", 1),  # ends with " (C)."
        ("1", "\\boxed{B}", 0),
        ("2", "\\boxed{0.5}", 1),  # numbers rounded to 2 decimals
        ("2", "\\boxed{\\dfrac{1}{2}}", 1),
        ("2", "The answer is 1/2.", 1),
        ("2", "\\boxed{0.501}", 1),
        ("2", "x = \\boxed{0.51}", 0),
        ("3", "<think>maybe \\boxed{A}</think>The answer is \\boxed{D}", 1),
    ],
)
def test_mathvision_scores(mathvision_dir, rid, response, correct):
    items, _ = load("mathvision", mathvision_dir)
    it = next(i for i in items if i["id"] == rid)
    assert score("mathvision", it, response).correct == correct


# ---------------------------------------------------------------- OlympiadBench

OLY_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("question", pa.string()),
        ("solution", pa.list_(pa.string())),
        ("final_answer", pa.list_(pa.string())),
        ("context", pa.string()),
        *[(f"image_{i}", IMG) for i in range(1, 6)],
        ("modality", pa.string()),
        ("difficulty", pa.string()),
        ("is_multiple_answer", pa.bool_()),
        ("unit", pa.string()),
        ("answer_type", pa.string()),
        ("error", pa.string()),
        ("question_type", pa.string()),
        ("subfield", pa.string()),
        ("subject", pa.string()),
        ("language", pa.string()),
    ]
)


def oly_row(
    rid,
    question,
    final,
    answer_type="Numerical",
    *,
    multiple=False,
    unit=None,
    error=None,
    subject="Math",
    modality="Text-only",
    context=None,
    images=None,
    language="English",
    qtype="Open-ended",
):
    row = {
        "id": rid,
        "question": question,
        "solution": ["..."],
        "final_answer": final,
        "context": context,
        "modality": modality,
        "difficulty": "Competition",
        "is_multiple_answer": multiple,
        "unit": unit,
        "answer_type": answer_type,
        "error": error,
        "question_type": qtype,
        "subfield": "Algebra" if subject == "Math" else "Mechanics",
        "subject": subject,
        "language": language,
    }
    for i in range(1, 6):
        row[f"image_{i}"] = (images or {}).get(i)
    return row


@pytest.fixture(scope="module")
def oly_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("OlympiadBench")
    d = root / "OlympiadBench"
    maths = [
        oly_row(1, "Find x.", ["$\\frac{1}{2}$"]),
        oly_row(2, "Find all roots.", ["$3, -1$"], multiple=True),
        oly_row(3, "Find the sum.", ["$n(n+1)$"], "Expression"),
        oly_row(5, "Solve the inequality.", ["$(-\\infty, 2)$"], "Interval"),
    ]
    write(str(d / "OE_TO_maths_en_COMP" / "train-00000-of-00001.parquet"), maths, OLY_SCHEMA)
    phys = [
        oly_row(
            4,
            "Find g from <image_1>.",
            ["$9.8$"],
            unit="m/s^2",
            error="1e-1",
            subject="Physics",
            modality="Multimodal",
            context="A ball is dropped.",
            images={1: img(77, "g.png")},
        ),
    ]
    write(str(d / "OE_MM_physics_en_COMP" / "train-00000-of-00001.parquet"), phys, OLY_SCHEMA)
    zh = [oly_row(9, "求x。", ["$1$"], language="Chinese")]
    write(str(d / "OE_TO_maths_zh_CEE" / "train-00000-of-00001.parquet"), zh, OLY_SCHEMA)
    tp = [oly_row(10, "Prove it.", ["$1$"], qtype="Theorem proof")]
    write(str(d / "TP_TO_maths_en_COMP" / "train-00000-of-00001.parquet"), tp, OLY_SCHEMA)
    return root


def test_olympiadbench_reads_the_open_ended_subsets_with_the_reference_prompt(oly_dir):
    items, skips = load("olympiadbench", oly_dir)
    ids = [it["id"] for it in items]
    assert sorted(ids) == sorted(
        [
            "OE_TO_maths_en_COMP/1",
            "OE_TO_maths_en_COMP/2",
            "OE_TO_maths_en_COMP/3",
            "OE_TO_maths_en_COMP/5",
            "OE_MM_physics_en_COMP/4",
        ]
    )
    assert skips.as_dict() == {"theorem_proving": 1}
    phys = next(it for it in items if it["id"].endswith("/4"))
    assert phys["question"] == (
        "The following is an open-ended problem from an International Physics competition. The answer of The "
        "problem should be a numerical value. Please calculate the answer according to the given requirements and "
        "the information provided. Please use LaTeX format to represent the variables and formulas used in the "
        'solution process and results. Please end your solution with "So the final answer is \\boxed{answer}(unit)." '
        "and give the result explicitly, note that the unit of the answer should not be included in \\boxed{}.\n"
        "A ball is dropped.\nFind g from <image>."
    )
    assert phys["images"] == [{"bytes": png(77)}]
    multi = next(it for it in items if it["id"].endswith("/2"))
    assert "The problem has multiple answers, each of them should be a numerical value. " in multi["question"]
    assert "\\boxed{multiple answers connected with commas}" in multi["question"]
    everything, _ = load("olympiadbench", oly_dir, "oe_all")
    zh = next(it for it in everything if it["id"] == "OE_TO_maths_zh_CEE/9")
    assert zh["question"].startswith("以下是中国数学竞赛中的解答题，答案类型为数值。")
    mm, _ = load("olympiadbench", oly_dir, "oe_mm_en")
    assert [it["id"] for it in mm] == ["OE_MM_physics_en_COMP/4"]


@pytest.mark.parametrize(
    "rid,response,correct",
    [
        ("1", "So the final answer is \\boxed{\\frac{1}{2}}.", 1),
        ("1", "So the final answer is \\boxed{0.5}.", 1),  # a constant expression's value
        ("1", "So the final answer is \\boxed{0.5000001}.", 0),  # default tolerance 1e-8
        ("1", "we get \\boxed{1/2}", 1),  # no "So the final answer is": the whole text's boxes
        ("1", "So the final answer is \\boxed{50}.", 0),  # percentages only for plain numbers
        ("2", "So the final answer is \\boxed{-1, 3}.", 1),  # several answers, in any order
        ("2", "x is \\boxed{3} or \\boxed{-1}", 1),  # several boxes, joined by commas
        ("2", "So the final answer is \\boxed{3}.", 0),  # one answer of two
        ("3", "So the final answer is \\boxed{n^2+n}.", 1),  # expression equivalence
        ("3", "So the final answer is \\boxed{n^2}.", 0),
        ("5", "So the final answer is \\boxed{(-\\infty,2)}.", 1),
        ("5", "So the final answer is \\boxed{(-\\infty,2]}.", 0),  # interval ends differ
        ("4", "So the final answer is \\boxed{9.75} m/s^2.", 1),  # the row's tolerance 1e-1
        ("4", "So the final answer is \\boxed{9.6} m/s^2.", 0),
        ("4", "So the final answer is \\boxed{980}.", 1),  # a plain number may be the gold times 100
    ],
)
def test_olympiadbench_scores(oly_dir, rid, response, correct):
    items, _ = load("olympiadbench", oly_dir)
    it = next(i for i in items if i["id"].endswith(f"/{rid}"))
    assert score("olympiadbench", it, response).correct == correct


# ---------------------------------------------------------------- AIME 2024

H4_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("problem", pa.string()),
        ("solution", pa.string()),
        ("answer", pa.string()),
        ("url", pa.string()),
        ("year", pa.string()),
    ]
)
MJ_SCHEMA = pa.schema(
    [("ID", pa.string()), ("Problem", pa.string()), ("Solution", pa.string()), ("Answer", pa.int64())]
)


@pytest.fixture(scope="module")
def aime_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("aime_2024")
    url = "https://artofproblemsolving.com/wiki/index.php/2024_AIME_{}_Problems/Problem_{}"
    rows = [
        {
            "id": 60,
            "problem": "Find the number.",
            "solution": "...",
            "answer": "73",
            "url": url.format("I", 1),
            "year": "2024",
        },
        {
            "id": 61,
            "problem": "Find m+n.",
            "solution": "...",
            "answer": "033",
            "url": url.format("II", 4),
            "year": "2024",
        },
        {
            "id": 62,
            "problem": "Broken.",
            "solution": "...",
            "answer": "many",
            "url": url.format("II", 5),
            "year": "2024",
        },
    ]
    write(str(root / "data" / "train-00000-of-00001.parquet"), rows, H4_SCHEMA)
    return root


def test_aime_reads_both_publishers(aime_dir, tmp_path):
    items, skips = load("aime24", aime_dir)
    assert [(it["id"], it["answer"], it["breakdown"]["part"]) for it in items] == [
        ("60", "73", "I"),
        ("61", "33", "II"),
    ]
    assert skips.as_dict() == {"bad_field": 1}
    assert (
        items[0]["question"]
        == "Find the number.\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    mj = [{"ID": "2024-II-4", "Problem": "Find m+n.", "Solution": "...", "Answer": 33}]
    write(str(tmp_path / "aime_2024_problems.parquet"), mj, MJ_SCHEMA)
    items, _ = load("aime24", tmp_path / "aime_2024_problems.parquet")
    assert [(it["id"], it["answer"], it["breakdown"]["part"]) for it in items] == [("2024-II-4", "33", "II")]


@pytest.mark.parametrize(
    "response,correct",
    [
        ("\\boxed{073}", 1),  # leading zeros
        ("\\boxed{73}", 1),
        ("The answer is $73$.", 1),
        ("\\boxed{73.0}", 1),
        ("\\boxed{73.5}", 0),
        ("<think>\\boxed{73}</think> so \\boxed{37}", 0),  # only after the reasoning
        ("\\boxed{1,073}", 0),
        ("", 0),
    ],
)
def test_aime_scores(aime_dir, response, correct):
    items, _ = load("aime24", aime_dir)
    assert score("aime24", items[0], response).correct == correct


def test_missing_data_and_split_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        hub.split_sources(str(tmp_path / "none"), "test")
    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError, match="split 'validation'"):
        hub.split_sources(str(tmp_path), "validation")


# ---------------------------------------------------------------- generations, results, r1v2 score


def test_generations_file_tolerates_a_partial_last_line(tmp_path):
    path = str(tmp_path / "generations.jsonl")
    B.append_generations(path, [{"id": "a", "run": 0, "response": "x"}, {"id": "a", "run": 1, "response": "y"}])
    with open(path, "a") as f:
        f.write('{"id": "b", "run": 0, "resp')  # the writer was killed here
    got = B.read_generations(path)
    assert sorted(got) == [("a", 0), ("a", 1)]
    B.append_generations(path, [{"id": "b", "run": 0, "response": "z"}])
    assert sorted(B.read_generations(path)) == [("a", 0), ("a", 1), ("b", 0)]  # the partial line was cut
    with open(path, "a") as f:
        f.write('{"id": "c", "run": 0, "response": "w"}')  # whole, but killed before its newline
    assert ("c", 0) in B.read_generations(path)
    B.append_generations(path, [{"id": "d", "run": 0, "response": "v"}])
    assert sorted(B.read_generations(path)) == [("a", 0), ("a", 1), ("b", 0), ("c", 0), ("d", 0)]
    with open(path) as f:
        lines = f.read().splitlines()
    bad = lines[:1] + ["garbage"] + lines[1:]
    with open(path, "w") as f:
        f.write("\n".join(bad) + "\n")
    with pytest.raises(ValueError, match="generations.jsonl:2"):
        B.read_generations(path)


def test_summary_averages_runs_per_item_and_breaks_down():
    items = [
        {"id": "a", "breakdown": {"subject": "x", "skills": ["s1", "s2"]}},
        {"id": "b", "breakdown": {"subject": "y", "skills": ["s1"]}},
    ]
    p = B.Protocol("demo", "test", runs=2)
    scored = [
        (0, 0, base.Score(1.0), {"finished": True}),
        (0, 1, base.Score(0.0, None, "no_answer"), {"finished": False}),
        (1, 0, base.Score(1.0), {"finished": True}),
        (1, 1, base.Score(1.0), {"finished": True}),
    ]
    res = B.summarize(items, scored, p, {"missing_image": 2})
    assert res["pass@1"] == 0.75  # (0.5 + 1.0) / 2
    assert res["per_run"] == {"0": 1.0, "1": 0.5}
    assert res["pass@1_counting_skipped"] == 1.5 / 4
    assert res["breakdown"]["subject"] == {"x": {"pass@1": 0.5, "n": 1}, "y": {"pass@1": 1.0, "n": 1}}
    assert res["breakdown"]["skills"]["s1"] == {"pass@1": 0.75, "n": 2}
    assert res["truncated"] == 1 and res["score_details"] == {"no_answer": 1}
    md = B.results_markdown(res)
    assert "pass@1 75.0" in md and "| s2 | 50.0 | 1 |" in md


def test_score_command_rescoring_saved_responses(aime_dir, tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    lines = [
        {"id": "60", "response": "\\boxed{73}"},
        {"id": "60", "response": "\\boxed{72}"},  # its second run
        {"id": 61, "response": "so \\boxed{33}"},
        {"id": 61, "response": "\\boxed{033}"},
    ]
    preds.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    rc = main(
        ["score", "--benchmark", "aime24", "--data", str(aime_dir), "--predictions", str(preds), "--out", str(out)]
    )
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["pass@1"] == 0.75 and res["per_run"] == {"0": 1.0, "1": 0.5} and res["skipped"] == {"bad_field": 1}
    assert "pass@1 75.0" in capsys.readouterr().out
    scores = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert [(s["id"], s["run"], s["correct"], s["extracted"]) for s in scores] == [
        ("60", 0, 1.0, "73"),
        ("60", 1, 0.0, "72"),
        ("61", 0, 1.0, "33"),
        ("61", 1, 1.0, "33"),
    ]
    # our generations.jsonl format (id, run) scores the same
    gens = tmp_path / "generations.jsonl"
    gens.write_text(
        "".join(
            json.dumps({"id": str(x["id"]), "run": i % 2, "response": x["response"]}) + "\n"
            for i, x in enumerate(lines)
        )
    )
    rc = main(["score", "--benchmark", "aime24", "--data", str(aime_dir), "--predictions", str(gens), "--runs", "1"])
    assert rc == 0 and "pass@1 100.0" in capsys.readouterr().out


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"id": "60"}', "preds.jsonl:1: field 'response' is missing"),
        ('{"response": "x"}', "preds.jsonl:1: field 'id' is missing"),
        ('{"id": "60", "response": 3}', "field 'response' should be a string"),
        ("not json", "preds.jsonl:1: not a JSON line"),
    ],
)
def test_score_command_names_the_bad_line(aime_dir, tmp_path, capsys, line, message):
    preds = tmp_path / "preds.jsonl"
    preds.write_text(line + "\n")
    rc = main(["score", "--benchmark", "aime24", "--data", str(aime_dir), "--predictions", str(preds)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err


def test_score_command_usage_errors(aime_dir, tmp_path, capsys):
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"id": "60", "response": "1"}\n')
    rc = main(["score", "--benchmark", "nope", "--data", str(aime_dir), "--predictions", str(preds)])
    assert rc == 2 and "unknown benchmark 'nope'" in capsys.readouterr().err
    rc = main(["score", "--benchmark", "aime24", "--data", str(aime_dir), "--predictions", str(preds), "--split", "x"])
    assert rc == 2 and "--split" in capsys.readouterr().err
    rc = main(["score", "--benchmark", "aime24", "--data", str(tmp_path / "none"), "--predictions", str(preds)])
    assert rc == 2 and "no such file" in capsys.readouterr().err


# ---------------------------------------------------------------- r1v2 eval --benchmark, end to end


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_model")
    cfg = model_config("tiny")
    model = r1v2_jax.init_model(cfg, seed=4)
    r1v2_jax.save_released(model, str(d / "model"))
    tiny_tokenizer(cfg.image_token_id).save(str(d / "model" / "tokenizer.json"))
    return str(d / "model")


def _eval(model, name, data, out, *extra):
    return main(
        [
            "eval",
            "--benchmark",
            name,
            "--data",
            str(data),
            "--model",
            model,
            "--out",
            str(out),
            "--max-new-tokens",
            "3",
            "--max-tiles",
            "1",
            "--batch-size",
            "4",
            *extra,
        ]
    )


@pytest.mark.parametrize(
    "name,fixture,n_items",
    [
        ("mmmu", "mmmu_dir", 6),
        ("mathvista", "mathvista_dir", 3),
        ("mathvision", "mathvision_dir", 3),
        ("olympiadbench", "oly_dir", 5),
        ("aime24", "aime_dir", 2),
    ],
)
def test_eval_benchmark_end_to_end(tiny_model, name, fixture, n_items, request, tmp_path, capsys):
    data = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    rc = _eval(tiny_model, name, data, out, "--runs", "1")
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    gens = B.read_generations(str(out / "generations.jsonl"))
    assert sorted(gens) == sorted((it["id"], 0) for it in load(name, data)[0])
    assert len(gens) == n_items and all(0 < g["tokens"] <= 3 for g in gens.values())
    res = json.loads((out / "results.json").read_text())
    assert res["items_scored"] == n_items and res["responses"] == n_items
    assert res["protocol"]["temperature"] == 0.6 and res["protocol"]["top_p"] == 0.95
    assert res["protocol"]["repetition_penalty"] == 1.05 and res["protocol"]["runs"] == 1
    assert res["pass@1"] == 0.0  # three tokens of an untrained model answer nothing
    assert (out / "results.md").read_text().startswith(f"# {name} (")
    assert f"# {name} (" in captured.out


def test_eval_benchmark_resumes_without_regenerating(tiny_model, aime_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert _eval(tiny_model, "aime24", aime_dir, out, "--runs", "2") == 0
    path = out / "generations.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 4
    path.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed while writing the second line
    sampled = []
    real = B.rollout

    def counting(run, sampler, params, batch, sp, group, key, tiles=None):
        sampled.append(int(np.asarray(batch["attention_mask"]).shape[0]))
        return real(run, sampler, params, batch, sp, group, key, tiles)

    monkeypatch.setattr(B, "rollout", counting)
    assert _eval(tiny_model, "aime24", aime_dir, out, "--runs", "2") == 0
    assert sampled == [3]  # the three missing (item, run) pairs, in one batch
    new = path.read_text().splitlines()
    assert new[0] == lines[0] and len(new) == 4
    assert sorted(B.read_generations(str(path))) == [("60", 0), ("60", 1), ("61", 0), ("61", 1)]
    sampled.clear()
    assert _eval(tiny_model, "aime24", aime_dir, out, "--runs", "3") == 0  # more runs: only the new ones
    assert sampled == [2] and len(path.read_text().splitlines()) == 6
    sampled.clear()
    rc = _eval(tiny_model, "aime24", aime_dir, out, "--runs", "3", "--temperature", "1.0")
    assert rc == 2 and "other settings" in capsys.readouterr().err and sampled == []


def test_eval_without_benchmark_refuses_benchmark_flags(tmp_path, capsys):
    rc = main(["eval", "--model", str(tmp_path), "--data", str(tmp_path / "x.jsonl"), "--runs", "2"])
    assert rc == 2 and "--runs: only with --benchmark" in capsys.readouterr().err


def test_eval_benchmark_counts_items_whose_prompt_cannot_be_built(tiny_model, tmp_path, capsys):
    rows = [
        mathvista_row("1", "5", "multi_choice", "text", choices=["3", "5", "7", "9"]),
        dict(
            mathvista_row("2", "12", "free_form", "integer"), decoded_image={"bytes": b"not an image", "path": "2.jpg"}
        ),
    ]
    write(str(tmp_path / "data" / "testmini-00000-of-00001-725687bf7a18d64b.parquet"), rows, MATHVISTA_SCHEMA)
    out = tmp_path / "out"
    assert _eval(tiny_model, "mathvista", tmp_path, out, "--runs", "2") == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["skipped"] == {"unreadable_image": 1}
    assert res["items"] == 2 and res["items_scored"] == 1 and res["responses"] == 2
    assert sorted(B.read_generations(str(out / "generations.jsonl"))) == [("1", 0), ("1", 1)]
    assert "left out: 1 {'unreadable_image': 1}" in (out / "results.md").read_text()


@pytest.mark.slow
def test_eval_benchmark_on_a_mesh_pads_the_last_batch(tiny_model, aime_dir, tmp_path, capsys, monkeypatch):
    """On a data-parallel mesh every batch has --batch-size rows; the padding rows' outputs
    are dropped, so each (item, run) is written once."""
    rows = []
    real = B.rollout

    def counting(run, sampler, params, batch, sp, group, key, tiles=None):
        rows.append(int(np.asarray(batch["attention_mask"]).shape[0]))
        return real(run, sampler, params, batch, sp, group, key, tiles)

    monkeypatch.setattr(B, "rollout", counting)
    out = tmp_path / "out"
    rc = _eval(tiny_model, "aime24", aime_dir, out, "--runs", "3", "--batch-size", "8", "--config.mesh=(1,8,1)")
    assert rc == 0, capsys.readouterr().err
    assert rows == [8]  # 2 items x 3 runs = 6 responses, padded to one batch of 8
    lines = (out / "generations.jsonl").read_text().splitlines()
    assert sorted((json.loads(x)["id"], json.loads(x)["run"]) for x in lines) == [
        (i, r) for i in ("60", "61") for r in range(3)
    ]


@pytest.mark.slow
def test_eval_benchmark_over_two_hosts(tiny_model, aime_dir, tmp_path):
    """Two processes share the items; process 0 writes every response once, and the results
    are those of the same responses re-scored."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "r1v2_jax.cli",
        "eval",
        "--benchmark",
        "aime24",
        "--data",
        str(aime_dir),
        "--model",
        tiny_model,
        "--out",
        str(out),
        "--runs",
        "2",
        "--max-new-tokens",
        "3",
        "--batch-size",
        "2",
        f"--coordinator=localhost:{port}",
        "--num-processes=2",
    ]
    procs = [
        subprocess.Popen(
            cmd + [f"--process-id={i}"], env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    try:
        results = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (o, e) in zip(procs, results):
        assert p.returncode == 0, e[-3000:]
    assert "# aime24 (train)" in results[0][0] and "# aime24" not in results[1][0]  # process 0 reports
    lines = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert sorted((x["id"], x["run"]) for x in lines) == [("60", 0), ("60", 1), ("61", 0), ("61", 1)]
    res = json.loads((out / "results.json").read_text())
    assert res["responses"] == 4 and res["skipped"] == {"bad_field": 1}  # read by both hosts, counted once


def test_score_in_worker_processes_matches_in_process(mathvision_dir, tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    lines = [
        {"id": "1", "response": "\\boxed{3}"},
        {"id": "2", "response": "\\boxed{0.5}"},
        {"id": "3", "response": "\\boxed{A}"},
        {"id": "1", "response": "\\boxed{B}"},
    ]
    preds.write_text("".join(json.dumps(x) + "\n" for x in lines))
    got = []
    for workers in ("0", "2"):
        out = tmp_path / f"out{workers}"
        argv = ["score", "--benchmark", "mathvision", "--data", str(mathvision_dir), "--predictions", str(preds)]
        assert main(argv + ["--out", str(out), "--score-workers", workers]) == 0, capsys.readouterr().err
        got.append((out / "scores.jsonl").read_text())
    assert got[0] == got[1]
    assert [json.loads(x)["correct"] for x in got[0].splitlines()] == [1.0, 0.0, 1.0, 0.0]  # (1,0) (1,1) (2,0) (3,0)


def test_a_scorer_that_raises_scores_zero_and_is_counted():
    def broken(it, response):
        raise RuntimeError("bug")

    bench = base.Benchmark("broken", ("test",), "test", lambda p, s, k: [], broken)
    items = [{"id": "a", "breakdown": {}}]
    scored = B.score_all(bench, items, {("a", 0): {"response": "x", "finished": True}}, 1, progress=False)
    assert [(i, r, s.correct, s.detail) for i, r, s, _ in scored] == [(0, 0, 0.0, "scorer_error")]
    res = B.summarize(items, scored, B.Protocol("broken", "test", runs=1), {})
    assert res["score_details"] == {"scorer_error": 1} and res["pass@1"] == 0.0


def test_power_towers_are_not_evaluated(oly_dir, mathvision_dir):
    """``10^{10^{10^{10}}}`` would keep mpmath busy for hours; like the OlympiadBench judge's
    ``can_compute_power`` such powers are not evaluated (and so not equal to a number)."""
    import time

    from r1v2_jax.benchmarks import mathcheck

    t0 = time.monotonic()
    assert mathcheck.value("10^{10^{10^{10}}}") is None and mathcheck.value("2^{5000}") is None
    assert mathcheck.value("3\\times10^{8}") == 3e8 and mathcheck.value("2^{10}") == 1024
    items, _ = load("olympiadbench", oly_dir)
    it = next(i for i in items if i["id"].endswith("/1"))
    assert score("olympiadbench", it, "So the final answer is \\boxed{10^{10^{10^{10}}}}.").correct == 0
    mv, _ = load("mathvision", mathvision_dir)
    assert score("mathvision", mv[1], "\\boxed{9^{9^{9^{9}}}}").correct == 0
    assert time.monotonic() - t0 < 30
