"""Majority-agreement self-reward: how many sibling samples reached the same answer."""

from __future__ import annotations

from collections import Counter, defaultdict


class MajorityAgreement:
    """Scorer: fraction of rows with the same ``prompt_id`` whose answer equals this row's.

    The denominator counts every sibling (including itself and unanswered ones), so a
    unanimous prompt scores 1.0. A ``None`` answer agrees with nothing and scores 0.0.
    """

    name: str = "majority"
    needs_base_logprobs: bool = False

    def __call__(self, rows: list[dict]) -> list[float]:
        counts: dict[str, Counter] = defaultdict(Counter)
        sizes: Counter = Counter()
        for row in rows:
            sizes[row["prompt_id"]] += 1
            if row["answer"] is not None:
                counts[row["prompt_id"]][row["answer"]] += 1
        out = []
        for row in rows:
            if row["answer"] is None:
                out.append(0.0)
            else:
                out.append(counts[row["prompt_id"]][row["answer"]] / sizes[row["prompt_id"]])
        return out
