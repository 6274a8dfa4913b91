"""The RL selector: a reward per sample (any score) becomes a group advantage per sample.

Label-free rewards collapse onto a wrong consensus (TTRL and SRT report it); the cures that act on the
prompts live here, as options: agreement gating (keep prompts whose majority share lies in a band:
SRT's ≥ 0.6, EMPO's [0.3, 1.0]), and an easy-first curriculum (keep the most self-consistent
fraction of the round's prompts), and a bonus for answers the other prompts do not give (the cure
that worked on the default task: `recipes/label_free.yaml`). Agreement is the share of a prompt's
samples giving its majority answer: a label-free measure of how sure the model is.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Hashable, Mapping, Sequence

from selfimprove.metrics import votes
from selfimprove.select.filters import by_prompt
from selfimprove.stages import Context, Stage, score_of

ESTIMATORS = ("grpo", "drgrpo", "rloo")


def group_advantages(rewards: Sequence[float], estimator: str = "grpo", eps: float = 1e-4) -> list[float]:
    """Advantages of one prompt's G samples.

    grpo: (r − mean) / (std + eps), the unbiased std (n − 1) as trl uses; drgrpo: r − mean (Dr. GRPO
    drops the std, which up-weights prompts the model nearly always or never solves); rloo: r minus
    the mean of the *other* samples. A group whose rewards are all equal gets zeros."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator: {estimator!r} is not one of {'|'.join(ESTIMATORS)}")
    g = len(rewards)
    if g == 0:
        return []
    mean = sum(rewards) / g
    if estimator == "rloo":
        if g == 1:
            return [0.0]
        return [r - (g * mean - r) / (g - 1) for r in rewards]
    centred = [r - mean for r in rewards]
    if estimator == "drgrpo":
        return centred
    std = math.sqrt(sum(c * c for c in centred) / (g - 1)) if g > 1 else 0.0
    return [c / (std + eps) for c in centred]


def rows_with_advantages(
    rows: list[dict],
    rewards: Sequence[float],
    groups: Mapping[Hashable, Sequence[int]],
    estimator: str,
    drop_zero: Callable[[Hashable], bool],
    offset: Sequence[float] | None = None,
) -> tuple[list[dict], int]:
    """The rows of `groups` (key -> row indices), in row order, each with its `advantage` within its
    group (`rewards` is per row) plus its `offset` (a term whose baseline is not the group's), and the
    number of groups whose advantages are all 0.

    An all-zero group is left out where `drop_zero(key)`: it teaches nothing, only its KL term would
    train, at the cost of a forward/backward. Rows in no group are left out."""
    advantage: dict[int, float] = {}
    zero_groups = 0
    for key, members in groups.items():
        group = group_advantages([rewards[i] for i in members], estimator)
        if offset is not None:
            group = [a + offset[i] for a, i in zip(group, members)]
        zero = not any(group)
        zero_groups += zero
        if not (zero and drop_zero(key)):
            advantage.update(zip(members, group))
    return [{**rows[i], "advantage": a} for i, a in sorted(advantage.items())], zero_groups


def agreement(answers: list) -> float:
    """The majority answer's share of all samples (unanswered ones count against it); 0 if none."""
    counts = votes(answers)
    return max(counts.values()) / len(answers) if counts else 0.0


def cross_prompt_surprisal(rows: list[dict], groups: dict[str, list[int]]) -> list[float]:
    """log((M + 1)/(c + 1)) per row: c of the M samples of the other prompts give this row's answer
    (0 for a row without an answer: no bonus)."""
    everywhere = votes([r["answer"] for r in rows])
    out = [0.0] * len(rows)
    for idx in groups.values():
        here = votes([rows[i]["answer"] for i in idx])
        others = len(rows) - len(idx)
        for i in idx:
            answer = rows[i]["answer"]
            if answer is not None:
                out[i] = math.log((others + 1) / (everywhere[answer] - here[answer] + 1))
    return out


def _finite(rewards: list[float]) -> list[float]:
    """A non-finite reward (an empty completion's -inf log-likelihood) becomes the group's worst."""
    finite = [r for r in rewards if math.isfinite(r)]
    floor = min(finite) if finite else 0.0
    return [r if math.isfinite(r) else floor for r in rewards]


class GroupAdvantage(Stage):
    """Rows with an `advantage` from `score/<reward>` grouped by prompt (grpo | drgrpo | rloo).

    `surprisal_weight` λ adds λ·log((M + 1)/(c + 1)) to a sample's reward, c the number of the *other*
    prompts' M samples giving the same answer: an answer many prompts share is one that does not depend
    on its prompt. Agreement rewards alone collapse onto such prompt-independent answers (SRT; here:
    the digit sums of a wrong algorithm); this is the diversity half of information maximisation
    (SHOT, Liang et al. 2020: minimise entropy within an input, maximise it across inputs).

    `surprisal_baseline`: what the bonus is measured against. `group` (as the agreement reward): the
    bonus is part of the reward whose group mean is subtracted, so a prompt whose samples all give one
    answer gets no advantage whatever that answer is. `batch`: each row's advantage also gets
    λ·(its group's mean surprisal − the batch's), in reward units: diversity is a quantity across
    prompts, so its baseline is the batch's, and a unanimous group whose answer other prompts share is
    pushed off it (a collapse's fixed point: all samples agree, so the group teaches nothing).

    `surprisal_gate`: a score in [0, 1] that scales each row's bonus (e.g. `view_majority`: the share of
    the problem's other forms whose majority gives this answer). Diversity across prompts also rewards
    a prompt-dependent wrong rule (38 + 6 = 104); gated, only an answer the other forms give is worth
    being different for.

    `min_agreement`/`max_agreement` drop prompts outside the band; `easiest_fraction` keeps that share
    of the remaining prompts, most self-consistent first; `drop_zero` drops groups whose advantages are
    all 0 (they would only add the KL term — and cost a forward/backward). The reward and advantage
    statistics go to `ctx.log`, into the round's record."""

    name = "group_advantage"
    writes = ("advantage",)

    def __init__(
        self,
        reward: str,
        estimator: str = "grpo",
        min_agreement: float | None = None,
        max_agreement: float | None = None,
        easiest_fraction: float | None = None,
        drop_zero: bool = True,
        surprisal_weight: float = 0.0,
        surprisal_baseline: str = "group",
        surprisal_gate: str | None = None,
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator: {estimator!r} is not one of {'|'.join(ESTIMATORS)}")
        if surprisal_baseline not in ("group", "batch"):
            raise ValueError(f"surprisal_baseline: {surprisal_baseline!r} is not group|batch")
        self.surprisal_baseline = surprisal_baseline
        if easiest_fraction is not None and not 0 < easiest_fraction <= 1:
            raise ValueError(f"easiest_fraction must be in (0, 1], got {easiest_fraction}")
        self.reward, self.estimator = reward, estimator
        self.min_agreement, self.max_agreement = min_agreement, max_agreement
        self.easiest_fraction, self.drop_zero = easiest_fraction, drop_zero
        self.surprisal_weight, self.surprisal_gate = surprisal_weight, surprisal_gate
        self.reads = (f"score/{reward}", "answer", *([f"score/{surprisal_gate}"] if surprisal_gate else []))

    def _gated(self, groups: dict[str, list[int]], rows: list[dict], ctx: Context) -> list[str]:
        share = {p: agreement([rows[i]["answer"] for i in idx]) for p, idx in groups.items()}
        kept = [
            p
            for p in groups
            if (self.min_agreement is None or share[p] >= self.min_agreement)
            and (self.max_agreement is None or share[p] <= self.max_agreement)
        ]
        if self.easiest_fraction is not None:
            n = max(1, round(self.easiest_fraction * len(groups)))
            kept = sorted(kept, key=lambda p: -share[p])[:n]  # stable: ties keep the round's order
        ctx.log("agreement", statistics.fmean(share.values()) if share else None)
        return kept

    def __call__(self, rows: list[dict], ctx: Context | None = None) -> list[dict]:
        ctx = ctx or Context(None, None, seed=0)  # called bare: its metrics go nowhere
        groups = by_prompt(rows)
        kept = set(self._gated(groups, rows, ctx))
        kept_groups = {p: idx for p, idx in groups.items() if p in kept}
        surprisal = cross_prompt_surprisal(rows, groups) if self.surprisal_weight else [0.0] * len(rows)
        if self.surprisal_gate:
            surprisal = [s * score_of(row, self.surprisal_gate) for s, row in zip(surprisal, rows)]
        row_reward = [0.0] * len(rows)
        for idx in kept_groups.values():
            group_rewards = _finite([score_of(rows[i], self.reward) for i in idx])
            for r, i in zip(group_rewards, idx):
                row_reward[i] = r + self.surprisal_weight * surprisal[i]
        offset = None
        if self.surprisal_weight and self.surprisal_baseline == "batch" and kept_groups:
            kept_rows = [i for idx in kept_groups.values() for i in idx]
            batch_mean = statistics.fmean(surprisal[i] for i in kept_rows)
            offset = [0.0] * len(rows)
            for idx in kept_groups.values():
                between = statistics.fmean(surprisal[i] for i in idx) - batch_mean
                for i in idx:
                    offset[i] = self.surprisal_weight * between
        out, zero_groups = rows_with_advantages(
            rows, row_reward, kept_groups, self.estimator, lambda _: self.drop_zero, offset
        )
        rewards = [row_reward[i] for idx in kept_groups.values() for i in idx]
        advantages = [row["advantage"] for row in out]
        n_kept = len(kept)
        for name, value in {
            "prompts_kept": n_kept / max(len(groups), 1),
            "reward_mean": statistics.fmean(rewards) if rewards else None,
            "reward_std": statistics.pstdev(rewards) if len(rewards) > 1 else None,
            "zero_advantage_groups": zero_groups / n_kept if n_kept else None,
            "advantage_mean": statistics.fmean(advantages) if advantages else None,
            "advantage_abs_mean": statistics.fmean(abs(a) for a in advantages) if advantages else None,
        }.items():
            ctx.log(name, value)
        return out
