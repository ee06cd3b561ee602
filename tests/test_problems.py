"""Problems from reasoning-gym, answer extraction, scoring and voting (no model needed)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from rksc_sgl.problems import (Problem, Solution, extract_answer, load_problems, majority_vote, normalize_number,
                               question_prompt, score)


def test_load_is_deterministic_for_a_seed():
    a = load_problems("basic_arithmetic", count=5, seed=7)
    b = load_problems("basic_arithmetic", count=5, seed=7)
    assert [(p.question, p.answer) for p in a] == [(p.question, p.answer) for p in b]
    assert len(a) == 5 and [p.index for p in a] == list(range(5))
    other = load_problems("basic_arithmetic", count=5, seed=8)
    assert [p.question for p in other] != [p.question for p in a]


def test_easy_preset_is_small_addition_and_subtraction():
    for p in load_problems(count=20, seed=1, difficulty="easy"):
        expr = p.entry["metadata"]["expression"]
        assert not set(expr) & set("*/()"), expr
        assert len(re.findall(r"\d+", expr)) == 2, expr


def test_config_overrides_and_default_difficulty():
    probs = load_problems(count=10, seed=0, difficulty="default", operators=("*",), allow_parentheses=False,
                          allow_negation=False, min_terms=2, max_terms=2)
    assert all("*" in p.question and "+" not in p.question for p in probs)


def test_gsm_symbolic_loads_and_scores():
    (p,) = load_problems("gsm_symbolic", count=1, seed=0)
    assert p.question and p.answer
    assert score(p, p.answer) == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError):
        load_problems(count=0)
    with pytest.raises(ValueError):
        load_problems(difficulty="impossible")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_problems("no_such_dataset_xyz", count=1)


def test_problem_is_frozen_and_hashable():
    (p,) = load_problems(count=1, seed=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.answer = "0"
    assert hash(p) == hash(Problem(question=p.question, answer=p.answer, index=p.index))


def test_score_of_right_and_wrong_answers():
    for p in load_problems(count=5, seed=3):
        assert score(p, p.answer) == 1.0
        assert score(p, f"{p.answer}.0") == 1.0  # numerically equal
        assert score(p, str(int(p.answer) + 1)) == 0.0
        assert score(p, None) == 0.0


def test_score_without_dataset_compares_numbers():
    p = Problem(question="1 + 1", answer="2")
    assert score(p, "2.0") == 1.0 and score(p, "3") == 0.0


@pytest.mark.parametrize("text, expected", [
    ("4 - 1 = 3\nAnswer: 3", "3"),
    ("The answer is 4 - 1 = 3.\nThen I checked 7.", "3"),
    ("Answer: -4", "-4"),
    ("so 5-3=2", "2"),                        # a minus between numbers is not a sign
    ("The final answer is **1,234.0**.", "1234"),
    ("Answer: 3 (because 4 - 1)", "3"),
    ("answer is 2.\nLater we get 7", "2"),
    ("Answer: 5\n...\nThe answer is 6", "6"),  # the last answer phrase wins
    ("x = \u22125", "-5"),                     # unicode minus
    ("Final answer: $12$", "12"),
    ("The answer is 3.5 apples", "3.5"),
    ("We add 2 and 3 to get 5", "5"),         # no phrase: the last number
    ("Answer: unknown. But 8 fits.", "8"),     # a phrase without a number is skipped
    ("no numbers here", None),
    ("", None),
    (None, None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalize_number():
    assert normalize_number("+3") == "3"
    assert normalize_number("-0.0") == "0"
    assert normalize_number("2.50") == "2.5"
    assert normalize_number("1,000") == "1000"


def test_majority_vote():
    assert majority_vote(["3", "4", "4", "3", None]) == "3"  # tie: first seen wins
    assert majority_vote([None, "5", "3", "3"]) == "3"
    assert majority_vote([None, None, "7"]) == "7"            # None is not a vote
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None
    assert majority_vote(iter(["1", "2", "2"])) == "2"


def test_prompt_and_solution_shapes():
    assert question_prompt("  Calculate 1 + 1. ").startswith("Calculate 1 + 1. ")
    assert "Answer:" in question_prompt("q")
    assert Solution(answer=None).candidates == []
