"""Policy-gradient objectives on group advantages: GRPO, Dr. GRPO, RLOO (METHODS.md §13).

Pure functions first (the advantages, the k3 estimator, the clipped surrogate), then the objective
that combines them per token. The advantages are computed by a stage (`select.GroupAdvantage`) from
a reward column, so any scorer can be the reward; the objective reads them from the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from selfimprove.objectives.base import Objective, mean_metric

ESTIMATORS = ("grpo", "drgrpo", "rloo")
KL_COLUMN = {"base": "ref_logprobs", "ema": "ema_logprobs"}  # the rows' columns, as collate names them


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


def k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """The k3 estimator of KL(π‖π_ref) per token: exp(d) − d − 1, d = log π_ref − log π (≥ 0, unbiased
    for tokens sampled from π)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_eps: float
) -> tuple[Tensor, Tensor]:
    """(−min(ρA, clip(ρ, 1 − ε, 1 + ε)A) per token, whether the clip was active), ρ = π/π_old. With one
    step per batch ρ = 1 and the gradient is A·∇log π: REINFORCE with the group baseline."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).detach()


class PolicyGradient(Objective):
    """Per completion token: clipped surrogate with the row's advantage, plus β·k3 KL to the reference
    (`kl_to`: the base's `ref_logprobs` or the EMA's `ema_logprobs`, attached by a reference stage). π_old is the
    recorded `old_logprobs` (the sampling distribution, after temperature); a row without them (real
    data) is on-policy, ρ = 1. Normalisation: GRPO "sequence", DAPO "token", Dr. GRPO "constant".
    `first_turn_beta` (two-attempt rows) sets the KL coefficient of first attempts apart: SCoRe Stage I."""

    name = "pg"

    def __init__(
        self,
        clip_eps: float = 0.2,
        beta: float = 0.0,
        kl_to: str = "base",
        normalize: str = "sequence",
        constant_length: int | None = None,
        temperature: float = 1.0,
        first_turn_beta: float | None = None,
    ):
        super().__init__(normalize, constant_length, temperature)
        if kl_to not in KL_COLUMN:
            raise ValueError(f"kl_to: {kl_to!r} is not one of {'|'.join(KL_COLUMN)}")
        self.clip_eps, self.beta, self.kl_to = clip_eps, beta, kl_to
        self.first_turn_beta = first_turn_beta  # SCoRe Stage I: β2 on the first attempt, β on the second
        # the row columns this objective needs: a stage must write them (checked at config time)
        self.uses_kl = beta > 0 or (first_turn_beta or 0) > 0
        self.reads = (
            ("advantage",)
            + ((KL_COLUMN[kl_to],) if self.uses_kl else ())
            + (("turn",) if first_turn_beta is not None else ())
        )

    def __call__(self, logits: Tensor, batch: dict):
        logp, mask = self.token_logprobs(logits, batch)
        if logp.numel() == 0:
            return logits.sum() * 0.0, self.normalizer([batch]), {}
        if "advantages" not in batch:
            raise KeyError(
                "the policy-gradient objective needs an advantage column: selector=group_advantage"
            )
        advantages = batch["advantages"][:, 1:][mask]
        old = batch["old_logprobs"][:, 1:][mask] if "old_logprobs" in batch else logp.detach()
        per_token, clipped = clipped_surrogate(logp, old, advantages, self.clip_eps)
        metrics = {"pg/clip_frac": mean_metric(clipped), "pg/ratio": mean_metric(torch.exp(logp - old))}
        reference = KL_COLUMN[self.kl_to]
        if self.uses_kl or reference in batch:  # the KL is logged whenever the rows carry the reference
            if reference not in batch:
                raise KeyError(f"objective.beta > 0 needs {reference}: add verifier reference_{self.kl_to}")
            kl = k3(logp, batch[reference][:, 1:][mask])
            metrics["pg/kl"] = mean_metric(kl)
        if self.uses_kl:
            beta = self.beta
            if self.first_turn_beta is not None:  # per token: its row's turn picks the coefficient
                first = (batch["turns"] == 1)[:, None].expand_as(mask)[mask]
                beta = torch.where(first, self.first_turn_beta, self.beta)
            per_token = per_token + beta * kl
        metrics["pg/logp"] = mean_metric(logp)
        return self.reduce(per_token, mask, batch), self.normalizer([batch]), metrics
