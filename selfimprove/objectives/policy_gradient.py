"""Policy-gradient objectives on group advantages: GRPO, Dr. GRPO, RLOO (GRPO: Shao et al. 2402.03300; Dr. GRPO: Liu et al. 2503.20783; RLOO: Ahmadian et al. 2402.14740).

Pure functions first (the advantages, the k3 estimator, the clipped surrogate), then the objective
that combines them per token. The advantages are computed by a stage (`select.GroupAdvantage`) from
a reward column, so any scorer can be the reward; the objective reads them from the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfimprove.objectives.base import Objective, mean_metric
from selfimprove.verify.reference import COLUMN as REFERENCE_COLUMN


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
    (`kl_to`: the base's `ref_logprobs` or the EMA's `ema_logprobs`, attached by a reference stage).
    π_old is the rows' recorded `logprobs`: the sampling policy's per-token log-probs at the temperature
    it sampled with, before top_p / typical_p truncation (`decode.policy_logprobs`), the same softmax
    as π here when `temperature` is the sampler's, so ρ = 1 on fresh samples; a batch without them
    (real data) is on-policy, ρ = 1. Normalisation: GRPO "sequence", DAPO "token",
    Dr. GRPO "constant". `first_turn_beta` (two-attempt rows) sets the KL coefficient of first
    attempts apart: SCoRe Stage I."""

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
        if kl_to not in REFERENCE_COLUMN:
            raise ValueError(f"kl_to: {kl_to!r} is not one of {'|'.join(REFERENCE_COLUMN)}")
        self.clip_eps, self.beta, self.kl_to = clip_eps, beta, kl_to
        self.first_turn_beta = first_turn_beta  # SCoRe Stage I: β2 on the first attempt, β on the second
        self.uses_kl = beta > 0 or (first_turn_beta or 0) > 0
        reference = REFERENCE_COLUMN[kl_to]
        # the row columns this objective needs: a stage must write them (checked at config time)
        self.reads = (
            ("advantage",)
            + ((reference,) if self.uses_kl else ())
            + (("turn",) if first_turn_beta is not None else ())
        )
        self.optional = ("logprobs",) + (() if self.uses_kl else (reference,))  # the KL is logged if present

    def __call__(self, logps: Tensor, batch: dict, normalizer: float):
        mask = batch["completion"]
        if "advantage" not in batch:
            raise KeyError(
                "the policy-gradient objective needs an advantage column: selector=group_advantage"
            )
        advantages = batch["advantage"].to(logps.device)[:, None].expand_as(logps)
        old = batch["logprobs"] if "logprobs" in batch else logps.detach()
        per_token, clipped = clipped_surrogate(logps, old, advantages, self.clip_eps)
        ratio = torch.exp(logps - old)
        metrics = {"pg/clip_frac": mean_metric(clipped[mask]), "pg/ratio": mean_metric(ratio[mask])}
        reference = REFERENCE_COLUMN[self.kl_to]
        if reference in batch:
            kl = k3(logps, batch[reference])
            metrics["pg/kl"] = mean_metric(kl[mask])
            if self.uses_kl:
                beta = torch.full_like(logps, self.beta)
                if self.first_turn_beta is not None:  # per row: its turn picks the coefficient
                    first = (batch["turn"] == 1).to(logps.device)[:, None].expand_as(logps)
                    beta = torch.where(first, self.first_turn_beta, beta)
                per_token = per_token + beta * kl
        elif self.uses_kl:
            raise KeyError(f"objective.beta > 0 needs {reference}: add verifier reference_{self.kl_to}")
        metrics["pg/logp"] = mean_metric(logps[mask])
        return self.reduce(per_token, batch, normalizer), metrics
