"""Ground-truth correctness as a 'score'."""

from __future__ import annotations


class GroundTruth:
    """Scorer: ``float(row["correct"])``.

    Evaluation / oracle only: it reads the labels, so a self-improvement run that selects
    on it is the supervised (ReST-EM / STaR style) baseline, not self-improvement.
    """

    name: str = "correct"
    needs_base_logprobs: bool = False

    def __call__(self, rows: list[dict]) -> list[float]:
        return [float(bool(row["correct"])) for row in rows]
