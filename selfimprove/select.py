"""Selectors: which sampled rows to train on.

Each selector is built by ``hydra.utils.instantiate`` and maps rows to the ascending list of
indices to keep. Selecting nothing is legal and returns ``[]``; the loop decides what then.
Scores are read from ``row[f"score/{name}"]``, where the loop stored them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator

from selfimprove.metrics import majority_answer, votes


def _by_prompt(rows: list[dict]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[row["prompt_id"]].append(i)
    return groups


def _score(row: dict, name: str) -> float:
    key = f"score/{name}"
    if key not in row:
        raise KeyError(f"row lacks {key!r}: is a scorer named {name!r} configured?")
    s = float(row[key])
    return -math.inf if math.isnan(s) else s  # a nan score must never be picked


class BestOfN:
    """Per prompt, the ``per_prompt`` highest-scoring rows (SFT-Sharpening's y^BoN).

    Ties go to the lowest ``sample_idx``. Rows below ``min_score`` are never kept, even if
    that leaves a prompt with nothing.
    """

    def __init__(self, score: str, per_prompt: int = 1, min_score: float | None = None) -> None:
        self.score = score
        self.per_prompt = per_prompt
        self.min_score = min_score

    def __call__(self, rows: list[dict]) -> list[int]:
        keep: list[int] = []
        for idx in _by_prompt(rows).values():
            scored = [(_score(rows[i], self.score), rows[i]["sample_idx"], i) for i in idx]
            if self.min_score is not None:
                scored = [t for t in scored if t[0] >= self.min_score]
            scored.sort(key=lambda t: (-t[0], t[1], t[2]))
            keep.extend(t[2] for t in scored[: self.per_prompt])
        return sorted(keep)


class MajorityVote:
    """Per prompt, one row (lowest ``sample_idx``) carrying the most-voted answer.

    Ties between answers go to the answer that appears first. The prompt is skipped unless
    the winner's share of *all* its rows (unanswered included) is >= ``min_agreement``.
    ``None`` answers never win.
    """

    def __init__(self, min_agreement: float = 0.0) -> None:
        self.min_agreement = min_agreement

    def __call__(self, rows: list[dict]) -> list[int]:
        keep: list[int] = []
        for idx in _by_prompt(rows).values():
            answers = [rows[i]["answer"] for i in idx]
            winner = majority_answer(answers)
            if winner is None:
                continue
            if votes(answers)[winner] / len(idx) < self.min_agreement:
                continue
            carriers = [i for i in idx if rows[i]["answer"] == winner]
            keep.append(min(carriers, key=lambda i: (rows[i]["sample_idx"], i)))
        return sorted(keep)


class Threshold:
    """Rows whose score lies in ``[min, max]`` (either bound optional).

    With ``unique``, duplicate completions within a prompt (compared after ``strip()``) are
    kept once, so repeated samples do not get extra weight in training. ``per_prompt`` caps
    the rows kept per prompt, highest score first (ties: lowest ``sample_idx``).
    """

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

    def _value(self, row: dict) -> float:
        return _score(row, self.score)

    def __call__(self, rows: list[dict]) -> list[int]:
        keep: list[int] = []
        for idx in _by_prompt(rows).values():
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
        return sorted(keep)


class GroundTruthFilter(Threshold):
    """Keep correct rows: Threshold on score "correct" >= 0.5.

    This USES THE LABELS -- the oracle baseline (ReST-EM / STaR style rejection sampling),
    not self-improvement. Reads ``score/correct`` if the loop stored it, else ``correct``.
    """

    def __init__(self, per_prompt: int | None = 4, unique: bool = True) -> None:
        super().__init__(score="correct", min=0.5, per_prompt=per_prompt, unique=unique)

    def _value(self, row: dict) -> float:
        if "score/correct" in row:
            return _score(row, "correct")
        return float(bool(row["correct"]))


def curation_probs(rewards: list[float]) -> list[float]:
    """Bradley-Terry / Plackett-Luce pick probabilities e^{r_k} / sum_j e^{r_j} (Ferbach §4)."""
    if not rewards:
        return []
    top = max(rewards)  # shift for stability; the ratio is unchanged
    w = [math.exp(r - top) for r in rewards]
    z = sum(w)
    return [x / z for x in w]


def _compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    if parts == 1:
        yield (total,)
        return
    for c in range(total + 1):
        for rest in _compositions(total - c, parts - 1):
            yield (c, *rest)


def curated_update(p0: list[float], r: list[float], K: int) -> list[float]:
    """Exact Eq. 6 for a finite categorical: one round of pure-synthetic curated retraining.

    p1(x) = p0(x) * E[K e^{r(x)} / (e^{r(x)} + sum_{i<K} e^{r(x_i)})], x_i ~ p0 i.i.d.; the
    expectation is summed over every multinomial count vector of the K-1 other draws, so
    the cost grows like K^(m-1) for m categories -- meant for small checks. Large K tends to
    p0 * e^r (normalised).
    """
    if K < 1 or len(p0) != len(r):
        raise ValueError("need K >= 1 and len(p0) == len(r)")
    support = [j for j, p in enumerate(p0) if p > 0]
    top = max(r[j] for j in support)
    w = [math.exp(x - top) for x in r]  # e^r up to a common factor, which cancels
    out = [0.0] * len(p0)
    for counts in _compositions(K - 1, len(support)):
        logp = math.lgamma(K) + sum(c * math.log(p0[j]) - math.lgamma(c + 1) for c, j in zip(counts, support))
        prob = math.exp(logp)
        others = sum(c * w[j] for c, j in zip(counts, support))
        for j in support:
            out[j] += prob * K * w[j] / (w[j] + others)
    return [p0[j] * out[j] for j in range(len(p0))]
