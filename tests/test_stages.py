"""The stage contract: declared columns, the order scorers run in, scores never computed twice."""

import pytest

from selfimprove.select import BestOfN
from selfimprove.stages import Context, Scorer, check_columns, order_stages
from selfimprove.verify import Combined, MajorityAgreement, SelfCertainty

CTX = Context(engine=None, task=None, seed=0)


class Counting(Scorer):
    """A scorer that counts the rows it was asked to score."""

    name = "counting"
    reads = ("completion",)

    def __init__(self) -> None:
        self.scored = 0

    def score(self, rows, ctx):
        self.scored += len(rows)
        return [float(len(r["completion"])) for r in rows]


def test_a_score_already_in_the_table_is_not_computed_again():
    scorer = Counting()
    rows = scorer([{"completion": "ab"}, {"completion": "c"}], CTX)
    assert [r["score/counting"] for r in rows] == [2.0, 1.0] and scorer.scored == 2
    again = scorer(rows, CTX)  # a resumed round reads its scored table back
    assert again is rows and scorer.scored == 2


def test_a_combined_score_runs_after_its_parts_whatever_the_config_order():
    combined = Combined(scores={"self_certainty": 1.0, "majority": 1.0})
    sc, maj = SelfCertainty(), MajorityAgreement()
    assert order_stages([combined, sc, maj]) == [sc, maj, combined]
    with pytest.raises(ValueError, match=r"verifier 'combined' reads \['score/majority'\]"):
        order_stages([combined, sc])


def test_context_generators_are_seeded_by_unit_and_parts():
    a, b = Context(None, None, seed=1), Context(None, None, seed=1)
    assert a.rng("x").random() == b.rng("x").random()
    assert a.rng("x").random() != a.rng("y").random() != Context(None, None, seed=2).rng("x").random()


def test_check_columns_names_the_selector_the_column_and_what_is_written():
    with pytest.raises(ValueError) as e:
        check_columns([SelfCertainty()], BestOfN(score="ptrue"))
    assert "selector 'best_of_n' reads ['score/ptrue']" in str(e.value)
    assert "verifiers write: ['score/self_certainty']" in str(e.value)
    check_columns([SelfCertainty()], BestOfN(score="self_certainty"))  # a written score passes
