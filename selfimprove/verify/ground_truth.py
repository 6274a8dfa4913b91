"""Ground truth as a score: the task's correctness, or its reward with partial credit."""

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


class TaskReward(Scorer):
    """Scorer: ``row["reward"]``, the task's own reward in [0, 1] (1.0 is correct). Where the task
    grants partial credit (RandomCalculation's and arithmetic's distance to the label, Wu et al.
    2507.10532) a near miss still ranks above a far one; elsewhere it equals `GroundTruth`.

    Reads the labels, as `GroundTruth` does: a ground-truth baseline, not self-improvement.
    """

    name = "task_reward"
    reads = ("reward",)

    def score(self, rows: list[dict], ctx: Context | None = None) -> list[float]:
        return [float(row["reward"]) for row in rows]
