"""Curated self-consuming retraining (Ferbach et al. 2407.09499).

From the K samples of a prompt one is drawn with probability softmax(r / temperature) — the
Bradley–Terry / Plackett–Luce choice of a curator whose reward is r, any scorer's score — and the
curated rows are mixed with real data at the ratio λ = synthetic : real (the real fraction is
1 / (1 + λ)). λ = ∞ is pure self-consumption, which collapses diversity onto the reward's top
level set (Thm 2.1); with λ < 1/(K−1) the KL to the real distribution stays bounded (Thm 2.4).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

from selfimprove.select.filters import by_prompt
from selfimprove.stages import Context, Stage, score_of


def curation_probs(rewards: list[float], temperature: float = 1.0) -> list[float]:
    """Bradley-Terry / Plackett-Luce pick probabilities e^{r_k/T} / sum_j e^{r_j/T}."""
    if not rewards:
        return []
    scaled = [-math.inf if r != r else r / temperature for r in rewards]  # nan: never preferred
    top = max(scaled)  # shift for stability; the ratio is unchanged
    if top == -math.inf:  # nothing scorable: a uniform pick
        return [1.0 / len(rewards)] * len(rewards)
    if top == math.inf:  # +inf (or r / T overflowing): a uniform pick among those, not inf - inf = nan
        n_top = scaled.count(math.inf)
        return [1.0 / n_top if x == math.inf else 0.0 for x in scaled]
    w = [math.exp(x - top) for x in scaled]
    z = sum(w)
    return [x / z for x in w]


def plackett_luce(rng: random.Random, rewards: list[float], k: int, temperature: float = 1.0) -> list[int]:
    """k distinct indices drawn one after another, each w.p. softmax(r / T) over those left."""
    left = list(range(len(rewards)))
    picked = []
    for _ in range(min(k, len(left))):
        probs = curation_probs([rewards[i] for i in left], temperature)
        j = rng.choices(range(len(left)), weights=probs)[0]
        picked.append(left.pop(j))
    return picked


def real_rows(task: Any, ctx: Context, n: int) -> list[dict]:
    """``n`` reference completions of training problems drawn uniformly (the real data p_ref)."""
    rng = ctx.rng("real")
    pool = getattr(task, "num_train", None) or 2**31
    eos = ctx.tokenizer.eos_token_id
    rows = []
    for k in range(n):
        problem = task.train_problem(rng.randrange(pool))
        text = task.reference_completion(problem)
        reward = task.reward(text, problem)
        rows.append(
            {
                "prompt_id": f"real/{problem.id}",
                "sample_idx": k,
                "messages": problem.messages,
                "prefill": problem.prefill,
                "prompt_ids": ctx.encode(problem),
                # the end-of-turn token too: sampled completions stop with it, real ones must teach it
                "completion_ids": ctx.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos],
                "completion": text,
                "answer": task.extract_answer(text),
                "target": problem.answer,
                "reward": reward,
                "correct": reward >= 1 - 1e-9,
                "source": "real",
            }
        )
    return rows


class Curation(Stage):
    """Per prompt, ``per_prompt`` of its samples drawn by Plackett–Luce on ``score`` / temperature,
    plus round(curated / synthetic_to_real) real rows (``synthetic_to_real``: λ; null or .inf: none).
    """

    name = "curation"

    def __init__(
        self,
        score: str,
        temperature: float = 1.0,
        synthetic_to_real: float | None = None,
        per_prompt: int = 1,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if synthetic_to_real is not None and synthetic_to_real <= 0:
            raise ValueError(
                f"synthetic_to_real (λ) must be > 0 or null (no real data), got {synthetic_to_real}"
            )
        if per_prompt < 1:
            raise ValueError(f"per_prompt must be >= 1, got {per_prompt}")
        self.score = score
        self.temperature = temperature
        self.mix = synthetic_to_real is not None and math.isfinite(synthetic_to_real)
        self.synthetic_to_real = synthetic_to_real
        self.per_prompt = per_prompt
        self.reads = (f"score/{score}",)

    def check(self, task: Any) -> None:
        if self.mix and not task.has_references():
            raise ValueError(
                f"selector.synthetic_to_real={self.synthetic_to_real} mixes in real data, but the task "
                f"{type(task).__name__} gives no reference completions (a JSONL/datasets task names them "
                "with task.reference_field=FIELD), or use selector.synthetic_to_real=null for none"
            )

    def __call__(self, rows: list[dict], ctx: Context) -> list[dict]:
        rng = ctx.rng("curate")
        keep: list[int] = []
        for idx in by_prompt(rows).values():
            rewards = [score_of(rows[i], self.score) for i in idx]
            keep.extend(idx[j] for j in plackett_luce(rng, rewards, self.per_prompt, self.temperature))
        curated = [{**rows[i], "source": "policy"} for i in sorted(keep)]
        if not self.mix:
            return curated
        n_real = math.floor(len(curated) / self.synthetic_to_real + 0.5)  # halves up, not to even
        return curated + real_rows(ctx.task, ctx, n_real)


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
