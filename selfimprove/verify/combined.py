"""One score from several: a weighted sum of z-scores, or a weighted mean of normalised ranks.

Scores live on unrelated scales (a log-likelihood in the hundreds, self-certainty near 1, a reward
model's logit), so they are standardised before they are weighed. `order_stages` runs this scorer
after the ones it reads, and `check_columns` refuses a config whose parts no verifier writes.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Literal

from selfimprove.stages import Context, Scorer, score_of

METHODS = ("zscore", "rank")
WITHIN = ("prompt", "all")


def _low_nan(values: list[float]) -> list[float]:
    return [-math.inf if v != v else float(v) for v in values]


def zscores(values: list[float]) -> list[float]:
    """(x - mean) / std (population std) over the finite values. -inf (and nan, read as -inf) rank
    lowest: one std below the lowest finite z; +inf one above the highest. All equal: all 0."""
    values = _low_nan(values)
    if all(v == values[0] for v in values):
        return [0.0] * len(values)
    finite = [v for v in values if math.isfinite(v)]
    z, low, high = {v: 0.0 for v in finite}, -1.0, 1.0
    if finite and min(finite) != max(finite):  # exact test: a float std of equal values may be 1e-17
        mean = math.fsum(finite) / len(finite)
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in finite) / len(finite))
        z = {v: (v - mean) / std for v in finite}
        low, high = min(z.values()) - 1.0, max(z.values()) + 1.0
    return [z[v] if math.isfinite(v) else (high if v > 0 else low) for v in values]


def ranks(values: list[float]) -> list[float]:
    """Normalised ranks in [0, 1] (0 lowest), ties at their average rank; -inf/nan lowest.
    One value, or all equal: 0.5 each."""
    values, n = _low_nan(values), len(values)
    if n == 1:
        return [0.5]
    order = sorted(range(n), key=lambda i: values[i])
    out = [0.0] * n
    start = 0
    while start < n:
        end = start
        while end + 1 < n and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            out[order[k]] = (start + end) / 2 / (n - 1)
        start = end + 1
    return out


class Combined(Scorer):
    """Scorer: ``scores`` (score name -> weight) combined by ``method`` within ``within``.

    ``zscore``: sum_k w_k z_k, each score standardised; ``rank``: sum_k w_k rank_k / sum_k |w_k|,
    ranks normalised to [0, 1]. ``within="prompt"`` standardises among a prompt's samples (what a
    per-prompt selector compares); ``"all"`` over every row of the call (one unit of whole prompts).
    A constant score adds 0 (zscore) or the same 0.5 w to every row (rank), never nan. A part
    weighed 0 is left out (neither read nor required).
    """

    def __init__(
        self,
        scores: Mapping[str, float],
        method: Literal["zscore", "rank"] = "zscore",
        within: Literal["prompt", "all"] = "all",
        name: str = "combined",
    ) -> None:
        given = {str(k): float(v) for k, v in dict(scores or {}).items()}
        if not given:
            raise ValueError("scores: name at least one score to combine, e.g. {self_certainty: 1.0}")
        if not all(math.isfinite(w) for w in given.values()) or not any(given.values()):
            raise ValueError(f"scores: weights must be finite and not all zero, got {given}")
        weights = {k: w for k, w in given.items() if w != 0}  # weight 0: the part is left out
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if within not in WITHIN:
            raise ValueError(f"within must be one of {WITHIN}, got {within!r}")
        if name in weights:
            raise ValueError(f"combined score {name!r} cannot combine itself")
        self.weights = weights
        self.method = method
        self.within = within
        self.name = name
        self.reads = tuple(f"score/{k}" for k in weights)

    def score(self, rows: list[dict], ctx: Context | None = None) -> list[float]:
        groups: dict[object, list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            groups[row["prompt_id"] if self.within == "prompt" else None].append(i)
        standardise = zscores if self.method == "zscore" else ranks
        total = 1.0 if self.method == "zscore" else sum(abs(w) for w in self.weights.values())
        out = [0.0] * len(rows)
        for idx in groups.values():
            for name, w in self.weights.items():
                for i, s in zip(idx, standardise([score_of(rows[i], name) for i in idx])):
                    out[i] += w * s / total
        return out
