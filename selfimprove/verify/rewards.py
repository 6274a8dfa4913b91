"""Rewards for RL from the model itself (TTRL, EMPO, INTUITOR, RLHF-sharpening), and one graded
oracle (RandomCalculation's partial reward, Wu et al.).

Each is a scorer, one float per sampled row, so a policy-gradient objective reads it like any score:
TTRL's majority vote, RENT's negative entropy, Co-rewarding-II's EMA teacher, and RandomCalculation's
graded distance to the label (which uses the labels).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from selfimprove.metrics import majority_answer
from selfimprove.select.filters import by_prompt
from selfimprove.stages import Context, Scorer
from selfimprove.tasks.base import numeric_reward


class MajorityVoteReward(Scorer):
    """TTRL (Zuo et al. 2504.16084; SRT 2505.21444): 1.0 when the row's answer is its prompt's
    majority answer, else 0.0. Label-free.

    The argmax of `MajorityAgreement` (EMPO's share of the vote): the same vote, ties to the first
    answer seen (`metrics.majority_answer`), so maj@k, this reward and the selectors agree.
    """

    name = "ttrl"
    reads = ("prompt_id", "answer")

    def score(self, rows: list[dict], ctx: Context | None = None) -> list[float]:
        out = [0.0] * len(rows)
        for idx in by_prompt(rows).values():
            winner = majority_answer([rows[i]["answer"] for i in idx])
            for i in idx:
                # a None answer never matches: when nobody answered, winner is None too
                out[i] = float(rows[i]["answer"] is not None and rows[i]["answer"] == winner)
        return out


class NegativeEntropy(Scorer):
    """RENT (Prabhudesai et al. 2505.22660): minus the mean per-token entropy of the model's
    distribution over the completion (recorded while sampling, no forward pass). Label-free.

    A row without tokens carries no evidence of confidence, and its entropy's real upper bound
    log(V) is unknown here (V is the model's). It gets the least confident score among this call's
    rows (0.0 if none has tokens): never 0.0 outright, the best possible score, which would reward
    stopping at once.
    """

    name = "rent"
    reads = ("entropy",)

    def score(self, rows: list[dict], ctx: Context | None = None) -> list[float]:
        scores = [-sum(r["entropy"]) / len(r["entropy"]) if len(r["entropy"]) else None for r in rows]
        floor = min((s for s in scores if s is not None), default=0.0)
        return [floor if s is None else float(s) for s in scores]


def _number(value: Any) -> float | None:
    """A float from a number or its text ("2.5", "-3", "7/4"); None when it is not one."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return float(Fraction(text))  # a fraction the task may write as "a/b"
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def graded_reward(answer: Any, target: Any) -> float:
    """r = 1 - 0.5 min(|a-b|, 1) - 0.5 min(|a-b| / (|b| + 1e-6), 1) in [0, 1]; 0 when the answer is
    None or not a number. ValueError when the target is not a number (a task this does not fit)."""
    b = _number(target)
    if b is None:
        raise ValueError(f"graded reward needs numeric targets, got {target!r}")
    a = _number(answer)
    return 0.0 if a is None else numeric_reward(a, b)


class GradedReward(Scorer):
    """RandomCalculation (Wu et al. 2507.10532, §4.3): partial credit by the distance between the
    row's answer and the target. USES THE LABELS: an oracle reward, not a self-reward.

    Exact-match rewards on multi-step arithmetic almost never fire; this one still ranks near misses.
    """

    name = "graded"
    reads = ("answer", "target")

    def score(self, rows: list[dict], ctx: Context | None = None) -> list[float]:
        return [graded_reward(r["answer"], r["target"]) for r in rows]


class EMATeacher(Scorer):
    """Co-rewarding-II (2508.00410): the slowly updated EMA weights (the run's `ema`) sample `n`
    answers per prompt; their majority answer is the pseudo-label, and a row scores 1.0 when its
    answer equals it. Label-free.

    Unlike TTRL, the label comes from a teacher that lags the policy, which breaks the loop where
    the policy rewards its own (possibly wrong) consensus. Needs ema.enabled=true: the engine
    raises a ValueError saying so, which is left to propagate.
    """

    name = "ema_teacher"
    reads = ("prompt_id", "prompt_ids", "answer")
    uses_ema = True  # the teacher samples from the "ema" weights

    def __init__(self, n: int = 8, temperature: float = 1.0, max_new_tokens: int = 6) -> None:
        if n < 1:
            raise ValueError(f"ema_teacher: n must be >= 1, got {n}")
        self.n = n
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens

    def labels(self, rows: list[dict], ctx: Context) -> dict[str, Any]:
        """prompt_id -> the EMA teacher's majority answer (None when none of its samples answered)."""
        groups = by_prompt(rows)
        prompts = [list(rows[idx[0]]["prompt_ids"]) for idx in groups.values()]
        # one generate call for the whole unit (batched), each prompt repeated n times, in prompt order;
        # the seed comes from the unit's seed, so a resumed or another rank's unit draws the same
        outs = ctx.generate(
            [p for p in prompts for _ in range(self.n)],
            weights="ema",
            seed=ctx.rng("ema_teacher").randrange(2**31),
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
        )
        answers = [ctx.task.extract_answer(o["completion"]) for o in outs]
        return {pid: majority_answer(answers[k * self.n : (k + 1) * self.n]) for k, pid in enumerate(groups)}

    def score(self, rows: list[dict], ctx: Context) -> list[float]:
        if not rows:
            return []
        label = self.labels(rows, ctx)
        return [float(r["answer"] is not None and r["answer"] == label[r["prompt_id"]]) for r in rows]


__all__ = ["EMATeacher", "GradedReward", "MajorityVoteReward", "NegativeEntropy", "graded_reward"]
