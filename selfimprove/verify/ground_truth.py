"""Ground-truth correctness as a 'score'."""

from __future__ import annotations

from selfimprove.stages import Context, Scorer


class GroundTruth(Scorer):
    """Scorer: ``float(row["correct"])``.

    Evaluation / oracle only: it reads the labels, so a self-improvement run that selects
    on it is the supervised (ReST-EM / STaR style) baseline, not self-improvement.
    """

    name = "correct"
    reads = ("correct",)

    def score(self, rows: list[dict], ctx: Context | None = None) -> list[float]:
        return [float(bool(row["correct"])) for row in rows]
