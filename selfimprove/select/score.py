"""SCoRe's rewards and advantages over two-attempt episodes (Kumar et al. 2409.12917).

Stage I trains the second attempt on its own reward while a strong KL keeps the first attempt near the
base: the first attempt's rows get no reward (advantage 0) and only their KL term (the objective's
`first_turn_beta`). Stage II rewards both attempts, the second with the shaping bonus α(r2 − r1) that
pays for turning a wrong answer right and charges for the reverse; discount 0, so each attempt has only
its own reward. Advantages are taken within each prompt's group of the same attempt.
"""

from __future__ import annotations

from collections import defaultdict

from selfimprove.select.advantage import group_advantages, rows_with_advantages
from selfimprove.stages import Context, Stage, score_of


def shaped_reward(r1: float, r2: float, alpha: float) -> float:
    """The second attempt's Stage II reward: r2 + α(r2 − r1). At α = 10, (1, 0) → −10 and (0, 1) → 11."""
    return r2 + alpha * (r2 - r1)


class SCoRe(Stage):
    """Rows of two-attempt episodes in, each with an `advantage`; all rows are kept (the first attempt's
    KL counts in Stage I too). `reward` names a score (the task's checker: `correct`)."""

    name = "score"
    writes = ("advantage",)

    def __init__(
        self,
        stage: int,
        reward: str = "correct",
        alpha: float = 10.0,
        estimator: str = "rloo",
        drop_zero: bool = True,
    ):
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        group_advantages([0.0], estimator)  # an unknown estimator fails at config time
        self.stage, self.reward, self.alpha, self.estimator = stage, reward, alpha, estimator
        self.drop_zero = drop_zero
        self.reads = ("turn", f"score/{reward}")

    def rewards(self, rows: list[dict]) -> list[float]:
        """Each row's reward for this stage."""
        first = {(r["prompt_id"], r["sample_idx"]): score_of(r, self.reward) for r in rows if r["turn"] == 1}
        out = []
        for r in rows:
            own = score_of(r, self.reward)
            if r["turn"] == 1:
                out.append(own if self.stage == 2 else 0.0)
            elif self.stage == 2:
                out.append(shaped_reward(first[(r["prompt_id"], r["sample_idx"])], own, self.alpha))
            else:
                out.append(own)
        return out

    def __call__(self, rows: list[dict], ctx: Context) -> list[dict]:
        if any(r.get("turn") not in (1, 2) for r in rows):
            raise ValueError("SCoRe needs two-attempt rows (rollout=two_attempts)")
        rewards = self.rewards(rows)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            groups[(r["prompt_id"], r["turn"])].append(i)
        # a rewarded group whose advantages are all 0 teaches nothing (its small KL aside), so it
        # is dropped; Stage I's first attempts stay, their KL is why they are there (key: prompt_id, turn)
        out, _ = rows_with_advantages(
            rows,
            rewards,
            groups,
            self.estimator,
            lambda key: self.drop_zero and (self.stage == 2 or key[1] == 2),
        )
        second = [rw for rw, r in zip(rewards, rows) if r["turn"] == 2]
        ctx.log("reward_t2", sum(second) / max(len(second), 1))
        ctx.log("stage", self.stage)
        ctx.log("rows_kept", len(out) / max(len(rows), 1))
        return out
