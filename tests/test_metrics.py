import math

import pytest

from selfimprove.metrics import (
    accuracy,
    auroc,
    ece,
    maj_at_k,
    pass_at_k,
    summarize_round,
)


def test_accuracy():
    assert accuracy([True, False, True, True]) == 0.75
    assert math.isnan(accuracy([]))


def test_pass_at_k_hand_and_closed_form():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                want = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_maj_at_k():
    groups = {
        "p": [("1", True), ("2", False), ("1", True)],
        "q": [("a", False), ("b", True)],  # tie -> first seen (wrong)
        "r": [(None, False), (None, False), ("x", True)],  # None does not vote
        "s": [(None, False)],
    }
    assert maj_at_k(groups) == pytest.approx(2 / 4)


def test_auroc_hand_examples():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)  # ties count 1/2
    assert auroc([1, 2, 3], [0, 1, 1]) == 1.0
    assert auroc([3, 2, 1], [0, 1, 1]) == 0.0
    # brute force over pairs with ties
    s, y = [0.2, 0.2, 0.5, 0.1, 0.5, 0.9], [1, 0, 1, 0, 0, 1]
    pos = [a for a, b in zip(s, y) if b]
    neg = [a for a, b in zip(s, y) if not b]
    want = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
    assert auroc(s, y) == pytest.approx(want)
    assert auroc([0.1, 0.2], [1, 1]) is None
    assert auroc([float("-inf"), 0.0, float("nan")], [0, 1, 0]) == 1.0


def test_ece():
    assert ece([0.9, 0.9, 0.1, 0.1], [1, 0, 0, 0]) == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    assert ece([1.0, 0.0], [1, 0]) == pytest.approx(0.0)
    assert math.isnan(ece([], []))


def test_summarize_round():
    rows = [
        {"prompt_id": "p", "answer": "1", "correct": True, "score/sc": 0.9},
        {"prompt_id": "p", "answer": "2", "correct": False, "score/sc": 0.1},
        {"prompt_id": "p", "answer": "1", "correct": True, "score/sc": 0.5},
        {"prompt_id": "q", "answer": "3", "correct": False, "score/sc": 0.4},
    ]
    out = summarize_round(rows, [rows[0], rows[3]], ["sc"])
    assert out["sample/accuracy"] == 0.5
    assert out["sample/pass_at_k"] == 0.5
    assert out["sample/maj_at_k"] == 0.5
    assert out["select/n"] == 2 and out["select/accuracy"] == 0.5
    assert out["auroc/sc"] == pytest.approx(1.0)
    empty = summarize_round(rows, [], ["sc"])
    assert empty["select/n"] == 0 and empty["select/accuracy"] is None
