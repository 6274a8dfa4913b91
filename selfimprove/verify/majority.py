"""Majority-agreement self-reward: how many sibling samples reached the same answer."""

from __future__ import annotations

from collections import defaultdict

from selfimprove.metrics import votes
from selfimprove.stages import Context, Scorer


class MajorityAgreement(Scorer):
    """Scorer: fraction of rows with the same ``prompt_id`` whose answer equals this row's
    (EMPO's reward; TTRL's is this score's argmax).

    The denominator counts every sibling (including itself and unanswered ones), so a
    unanimous prompt scores 1.0. A ``None`` answer agrees with nothing and scores 0.0.
    """

    name = "majority"
    reads = ("prompt_id", "answer")

    def score(self, rows: list[dict], ctx: Context | None = None) -> list[float]:
        answers: dict[str, list] = defaultdict(list)
        for row in rows:
            answers[row["prompt_id"]].append(row["answer"])
        counts = {prompt: votes(group) for prompt, group in answers.items()}
        return [
            0.0
            if row["answer"] is None
            else counts[row["prompt_id"]][row["answer"]] / len(answers[row["prompt_id"]])
            for row in rows
        ]
