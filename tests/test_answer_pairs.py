"""Curated preference pairs from known answers (``PairMining.source = "answers"``)."""

import pytest

from r1v2_jax.train.stages.mpo import PairMining, answer_pairs, wrong_answers
from r1v2_jax.train.stages.sft import cold_start_response


def _rec(i, answer, category="color", choices=()):
    return {
        "images": [f"images/{i}.png"],
        "question": f"<image>\nq{i}",
        "answer": answer,
        "choices": list(choices),
        "category": category,
        "_root": "/data",
        "_where": f"train.jsonl:{i}",
    }


def test_wrong_answers_by_category_and_by_choices():
    by_cat = {"color": {"red", "blue", "green"}, "count": {"3"}}
    assert wrong_answers(_rec(0, "red"), by_cat) == ["blue", "green"]
    assert wrong_answers(_rec(0, "Red "), by_cat) == ["blue", "green"]  # case and spaces as the verifier
    assert wrong_answers(_rec(1, "3", "count"), by_cat) == []  # nothing else seen in its category
    # a multiple-choice record draws from its own choices: letters when the answer is a letter
    assert wrong_answers(_rec(2, "B", "compare", ("big", "small", "same")), by_cat) == ["A", "C"]
    assert wrong_answers(_rec(3, "small", "compare", ("big", "small")), by_cat) == ["big"]


def test_answer_pairs_are_right_against_wrong_and_seeded():
    recs = [_rec(0, "red"), _rec(1, "blue"), _rec(2, "green"), _rec(3, "7", "count")]
    pairs, info = answer_pairs(recs, seed=0)
    assert info == {"prompts": 4, "pairs": 3, "source": "answers", "no_wrong_answer": 1}
    for p, r in zip(pairs, recs):
        assert p["chosen"] == cold_start_response(r)  # "colour</think>\boxed{red}"
        wrong = p["rejected"][p["rejected"].index("{") + 1 : -1]
        assert wrong in {"red", "blue", "green"} - {r["answer"]}
        assert p["rejected"] == cold_start_response(dict(r, answer=wrong))
        assert (p["images"], p["prompt"], p["_where"]) == (r["images"], r["question"], r["_where"])
    assert answer_pairs(recs, seed=0) == (pairs, info)  # every host builds the same list
    draws = {tuple(p["rejected"] for p in answer_pairs(recs, seed=s)[0]) for s in range(8)}
    assert len(draws) > 1  # the seed picks the wrong answer


def test_pair_source_is_checked():
    with pytest.raises(ValueError, match="source: expected one of policy, answers"):
        PairMining(source="gold")
