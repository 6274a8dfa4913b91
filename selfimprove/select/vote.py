"""Voting over a prompt's answers: Borda over a score (Kang et al. 2502.18581), majority at power 0."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from selfimprove.metrics import majority_answer, votes
from selfimprove.select.filters import by_prompt
from selfimprove.stages import Context, Stage, score_of


def borda_vote(answers: Sequence[Hashable | None], scores: Sequence[float] | None, power: float) -> int:
    """Index of the earliest output carrying the Borda-winning answer.

    Outputs are ranked by score (rank 1 = highest; equal scores keep input order) and each
    adds (N - r + 1)^power to its answer's total. Power 0 gives every output one vote: that is
    majority vote, and it is `metrics.majority_answer` (scores may then be None). ``None``
    answers (extraction failed) cannot win; equal totals go to the answer seen first. If no
    output has an answer, returns the highest-scoring output (the first one at power 0).
    """
    n = len(answers)
    if n == 0 or (scores is not None and n != len(scores)):
        raise ValueError("answers and scores must be non-empty and of equal length")
    if power == 0:
        winner = majority_answer(answers)
        return 0 if winner is None else list(answers).index(winner)
    if scores is None:
        raise ValueError("Borda voting with power > 0 needs scores")
    order = sorted(range(n), key=lambda i: -scores[i])  # stable: ties keep input order
    totals: dict[Hashable, float] = {}
    first_seen: dict[Hashable, int] = {}
    for i, a in enumerate(answers):
        if a is not None and a not in first_seen:
            first_seen[a] = i
            totals[a] = 0.0
    for rank0, i in enumerate(order):
        if answers[i] is not None:
            totals[answers[i]] += float(n - rank0) ** power  # rank r = rank0 + 1
    if not totals:
        return order[0]
    # max over answers in first-seen order: ties go to the earliest answer
    winner = max(first_seen, key=lambda a: (totals[a], -first_seen[a]))
    return first_seen[winner]


class Borda(Stage):
    """Per prompt, one row (lowest ``sample_idx``) carrying the Borda winner over ``score``.

    The vote weight of the output ranked r among N is (N - r + 1)^power; power 0 is majority
    vote. The prompt is skipped unless the winner's share of *all* its rows (unanswered
    included) is >= ``min_agreement`` (SRT's and EMPO's gate on self-consistency).
    """

    name = "borda"

    def __init__(self, score: str | None = "self_certainty", power: float = 0.5, min_agreement: float = 0.0):
        if power != 0 and not score:
            raise ValueError("Borda with power > 0 ranks by a score: set selector.score")
        self.score = score if power != 0 else None
        self.power = power
        self.min_agreement = min_agreement
        self.reads = ("answer",) + ((f"score/{score}",) if self.score else ())

    def __call__(self, rows: list[dict], ctx: Context | None = None) -> list[dict]:
        keep: list[int] = []
        for idx in by_prompt(rows).values():
            idx = sorted(idx, key=lambda i: (rows[i]["sample_idx"], i))
            answers = [rows[i]["answer"] for i in idx]
            scores = [score_of(rows[i], self.score) for i in idx] if self.score else None
            pick = idx[borda_vote(answers, scores, self.power)]
            winner = rows[pick]["answer"]
            if winner is None or votes(answers)[winner] / len(idx) < self.min_agreement:
                continue
            keep.append(pick)
        return [rows[i] for i in sorted(keep)]


class MajorityVote(Borda):
    """Per prompt, one row carrying the most-voted answer: Borda at power 0."""

    name = "majority"

    def __init__(self, min_agreement: float = 0.0) -> None:
        super().__init__(score=None, power=0.0, min_agreement=min_agreement)
