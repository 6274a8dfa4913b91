import math
import random

import pytest

from selfimprove.select import (
    BestOfN,
    Borda,
    GroundTruthFilter,
    MajorityVote,
    Threshold,
    curated_update,
    curation_probs,
)
from selfimprove.stages import Context
from selfimprove.verify import SequenceLogLik

CTX = Context(engine=None, task=None, seed=0)


def _row(pid, idx, answer=None, score=0.0, completion=None, correct=False, name="s"):
    return {
        "prompt_id": pid,
        "sample_idx": idx,
        "answer": answer,
        "completion": completion if completion is not None else f"{pid}-{idx}",
        "correct": correct,
        f"score/{name}": score,
    }


def _picked(selector, rows: list[dict]) -> list[int]:
    """Positions of the rows a selector kept (filters return the rows themselves)."""
    kept = {id(r) for r in selector(rows, CTX)}
    return [i for i, r in enumerate(rows) if id(r) in kept]


def _bon_trial(rng, pi, n, trial):
    ys = rng.choices(range(len(pi)), weights=pi, k=n)
    rows = [
        {"prompt_id": str(trial), "sample_idx": j, "y": y, "ref_logprobs": [math.log(pi[y])]}
        for j, y in enumerate(ys)
    ]
    return SequenceLogLik()(rows, CTX)


def test_bon_toy_categorical_law():
    # P(BoN on base log-prob picks the unique argmax y*) = 1 - (1 - pi(y*))^N
    pi = [0.4, 0.3, 0.2, 0.1]
    rng = random.Random(0)
    select = BestOfN(score="loglik_base")
    mean_logp = []
    for n in (1, 3, 8):
        rows = [r for t in range(1500) for r in _bon_trial(rng, pi, n, t)]
        picked = select(rows, CTX)
        assert len(picked) == 1500
        hit = sum(r["y"] == 0 for r in picked) / len(picked)
        assert hit == pytest.approx(1 - (1 - pi[0]) ** n, abs=0.04)
        mean_logp.append(sum(r["ref_logprobs"][0] for r in picked) / len(picked))
    assert mean_logp[0] < mean_logp[1] < mean_logp[2]  # the pick's log-prob rises with N


def test_bon_ties_per_prompt_floor_and_empty():
    rows = [
        _row("p", 2, score=1.0),
        _row("p", 0, score=1.0),
        _row("p", 1, score=0.5),
        _row("q", 0, score=-3.0),
        _row("q", 1, score=float("nan")),
    ]
    assert _picked(BestOfN(score="s"), rows) == [1, 3]  # tie -> lowest sample_idx
    assert _picked(BestOfN(score="s", per_prompt=2), rows) == [0, 1, 3, 4]
    assert _picked(BestOfN(score="s", per_prompt=5, min_score=0.0), rows) == [0, 1, 2]
    assert _picked(BestOfN(score="s", min_score=2.0), rows) == []
    assert _picked(BestOfN(score="s"), []) == []
    with pytest.raises(KeyError):
        _picked(BestOfN(score="missing"), rows)


def test_majority_vote():
    rows = [
        _row("p", 0, answer=None),
        _row("p", 1, answer="7"),
        _row("p", 2, answer="3"),
        _row("p", 3, answer="7"),
        _row("q", 0, answer="a"),
        _row("q", 1, answer="b"),  # tie a/b: a appears first
        _row("r", 0, answer=None),
        _row("r", 1, answer=None),
    ]
    assert _picked(MajorityVote(), rows) == [1, 4]
    assert _picked(MajorityVote(min_agreement=0.5), rows) == [1, 4]  # 2/4 and 1/2
    assert _picked(MajorityVote(min_agreement=0.6), rows) == []
    # the earliest carrier is by sample_idx, not list position
    shuffled = [_row("p", 5, answer="x"), _row("p", 1, answer="x"), _row("p", 0, answer="y")]
    assert _picked(MajorityVote(), shuffled) == [1]


def test_threshold_unique_and_cap():
    rows = [
        _row("p", 0, score=0.9, completion="same"),
        _row("p", 1, score=0.95, completion=" same "),
        _row("p", 2, score=0.2, completion="low"),
        _row("p", 3, score=0.7, completion="other"),
        _row("q", 0, score=0.8, completion="same"),
    ]
    assert _picked(Threshold(score="s", min=0.5), rows) == [1, 3, 4]  # dup keeps the higher score
    assert _picked(Threshold(score="s", min=0.5, unique=False), rows) == [0, 1, 3, 4]
    assert _picked(Threshold(score="s", min=0.5, per_prompt=1), rows) == [1, 4]
    assert _picked(Threshold(score="s", max=0.75), rows) == [2, 3]
    assert _picked(Threshold(score="s", min=0.99), rows) == []


def test_ground_truth_filter():
    rows = [_row("p", i, correct=i % 2 == 1, completion=f"c{i // 4}") for i in range(8)]
    for r in rows:
        del r["score/s"]
    assert _picked(GroundTruthFilter(), rows) == [1, 5]  # unique: c0 and c1 once each
    assert _picked(GroundTruthFilter(unique=False, per_prompt=3), rows) == [1, 3, 5]


def test_curation_probs():
    assert curation_probs([0.0, 1.0]) == pytest.approx([0.26894, 0.73106], abs=1e-5)
    assert curation_probs([1000.0, 1000.0]) == pytest.approx([0.5, 0.5])
    assert curation_probs([]) == []


def test_curated_update_hand_values():
    assert curated_update([0.5, 0.5], [0.0, 1.0], 2) == pytest.approx([0.3845, 0.6155], abs=1e-4)
    assert curated_update([0.5, 0.5], [0.0, 1.0], 1) == pytest.approx([0.5, 0.5])  # no choice
    big = curated_update([0.5, 0.5], [0.0, 1.0], 3000)  # K -> inf: p0 * e^r
    assert big == pytest.approx([0.2689, 0.7311], abs=1e-3)
    p3 = curated_update([0.2, 0.3, 0.5], [0.0, 1.0, 2.0], 4)
    assert sum(p3) == pytest.approx(1.0)


def test_curated_update_monte_carlo():
    p0, r, k = [0.2, 0.3, 0.5], [1.0, 0.0, 0.5], 3
    rng = random.Random(1)
    counts = [0, 0, 0]
    trials = 40000
    for _ in range(trials):
        xs = rng.choices(range(3), weights=p0, k=k)
        pick = rng.choices(xs, weights=curation_probs([r[x] for x in xs]))[0]
        counts[pick] += 1
    assert [c / trials for c in counts] == pytest.approx(curated_update(p0, r, k), abs=0.01)


@pytest.mark.parametrize(("power", "kept"), [(0.0, 1), (0.5, 1), (1.2, 0)])
def test_borda_selector_methods_hand_values(power, kept):
    # answers [B, A, A, C], self-certainty [.9, .8, .1, .5]; Borda weights (N − rank + 1)^p by hand:
    # p = 0.5 gives A 2.732 (√3 + 1) vs B 2.0; p = 1.2 gives B 5.278 vs A 4.737 (4^1.2 vs 3^1.2 + 1)
    rows = [_row("p", i, answer=a, score=s) for i, (a, s) in enumerate(zip("BAAC", [0.9, 0.8, 0.1, 0.5]))]
    assert _picked(Borda(score="s", power=power), rows) == [kept]


def test_majority_vote_is_borda_at_power_zero():
    rng = random.Random(3)
    rows = [
        _row(f"p{p}", i, answer=rng.choice(["1", "2", "3", None]), score=rng.random())
        for p in range(40)
        for i in range(6)
    ]
    for gate in (0.0, 0.5):
        majority = _picked(MajorityVote(min_agreement=gate), rows)
        assert majority == _picked(Borda(score="s", power=0.0, min_agreement=gate), rows)
        assert majority  # the gate leaves something to compare
    # with power > 0 the score matters: a different pick somewhere
    assert _picked(Borda(score="s", power=2.0), rows) != _picked(MajorityVote(), rows)
    assert Borda(score="s", power=0.0).reads == ("answer",)  # majority reads no score
    with pytest.raises(ValueError, match="selector.score"):
        Borda(score=None, power=0.5)
