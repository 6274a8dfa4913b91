"""Selectors that keep sampled rows by their score: best-of-N, a threshold, the task's checker."""

from __future__ import annotations

from collections import defaultdict

from selfimprove.stages import Context, Stage, score_of


def by_prompt(rows: list[dict]) -> dict[str, list[int]]:
    """Row indices grouped by prompt, in first-seen order."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[row["prompt_id"]].append(i)
    return groups


class BestOfN(Stage):
    """Per prompt, the ``per_prompt`` highest-scoring rows (SFT-Sharpening's y^BoN).

    Ties go to the lowest ``sample_idx``. Rows below ``min_score`` are never kept, even if
    that leaves a prompt with nothing.
    """

    name = "best_of_n"

    def __init__(self, score: str, per_prompt: int = 1, min_score: float | None = None) -> None:
        self.score = score
        self.per_prompt = per_prompt
        self.min_score = min_score
        self.reads = (f"score/{score}",)

    def __call__(self, rows: list[dict], ctx: Context | None = None) -> list[dict]:
        keep: list[int] = []
        for idx in by_prompt(rows).values():
            scored = [(score_of(rows[i], self.score), rows[i]["sample_idx"], i) for i in idx]
            if self.min_score is not None:
                scored = [t for t in scored if t[0] >= self.min_score]
            scored.sort(key=lambda t: (-t[0], t[1], t[2]))
            keep.extend(t[2] for t in scored[: self.per_prompt])
        return [rows[i] for i in sorted(keep)]


class Threshold(Stage):
    """Rows whose score lies in ``[min, max]`` (either bound optional).

    With ``unique``, duplicate completions within a prompt (compared after ``strip()``) are
    kept once, so repeated samples do not get extra weight in training. ``per_prompt`` caps
    the rows kept per prompt, highest score first (ties: lowest ``sample_idx``).
    """

    name = "threshold"

    def __init__(
        self,
        score: str,
        min: float | None = None,  # config-facing name, shadows builtin
        max: float | None = None,
        per_prompt: int | None = None,
        unique: bool = True,
    ) -> None:
        self.score = score
        self.min = min
        self.max = max
        self.per_prompt = per_prompt
        self.unique = unique
        self.reads = (f"score/{score}", "completion")

    def _value(self, row: dict) -> float:
        return score_of(row, self.score)

    def __call__(self, rows: list[dict], ctx: Context | None = None) -> list[dict]:
        keep: list[int] = []
        for idx in by_prompt(rows).values():
            scored = []
            for i in idx:
                s = self._value(rows[i])
                if (self.min is None or s >= self.min) and (self.max is None or s <= self.max):
                    scored.append((s, rows[i]["sample_idx"], i))
            scored.sort(key=lambda t: (-t[0], t[1], t[2]))
            seen: set[str] = set()
            kept_here: list[int] = []
            for _, _, i in scored:
                if self.per_prompt is not None and len(kept_here) >= self.per_prompt:
                    break
                text = rows[i]["completion"].strip()
                if self.unique and text in seen:
                    continue
                seen.add(text)
                kept_here.append(i)
            keep.extend(kept_here)
        return [rows[i] for i in sorted(keep)]


class GroundTruthFilter(Threshold):
    """Keep correct rows: Threshold on the task's checker (``correct``).

    This USES THE LABELS -- the oracle baseline (ReST-EM / STaR style rejection sampling),
    not self-improvement.
    """

    name = "ground_truth"

    def __init__(self, per_prompt: int | None = 4, unique: bool = True) -> None:
        super().__init__(score="correct", min=0.5, per_prompt=per_prompt, unique=unique)
        self.reads = ("correct", "completion")

    def _value(self, row: dict) -> float:
        return float(bool(row["correct"]))
