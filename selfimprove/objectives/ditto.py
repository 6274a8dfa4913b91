"""DITTO (Xu et al. 2206.02369, "Learning to Break the Loop"): pseudo-repetitive data and
the repetition penalty.

A sentence of a real text is repeated until the sequence is `max_tokens` long; from its second copy
on, each token's probability p is pushed towards λ times the (detached) probability of the same token
one copy earlier, so repeat probabilities decay like λ^n instead of growing. Each optimizer step is
DITTO with probability 1 − `mle_probability`, else MLE on the same source texts.

The selector (`selfimprove.select.DittoSequences`) builds, per text, an MLE row and a DITTO row with
the same `pair`; the objective (`Ditto`) picks one of the two views per step by a coin seeded per step.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from selfimprove.objectives.base import Objective, mean_metric
from selfimprove.objectives.sft import SFT


class Ditto(Objective):
    """Per step, by a coin: with probability `mle_probability` the token-mean NLL of the MLE rows,
    else the DITTO loss on the DITTO rows of the same pairs: per penalised token,
    −log(1 − |p_t − λ·sg(p_{t−rep_len})|), summed and divided by the number of penalised tokens.

    `lam` is λ (`--rep_reduce_gamma`): 0.5 for language modelling, 0.9 for summarisation."""

    name = "ditto"
    reads = ("rep_len",)  # the selector must write it (only the DITTO view's rows carry it)
    scope = "sequence"

    def __init__(self, lam: float = 0.5, mle_probability: float = 0.5, temperature: float = 1.0) -> None:
        super().__init__(normalize="token", temperature=temperature)
        if not 0 <= mle_probability <= 1:
            raise ValueError(f"mle_probability must be in [0, 1], got {mle_probability}")
        self.lam, self.mle_probability = lam, mle_probability
        self.mode = "mle"
        self.mle = SFT(temperature=temperature)  # the MLE steps: plain token-mean NLL

    def step_examples(self, examples: list[dict], seed: int) -> list[dict]:
        """The MLE rows or the DITTO rows, by a coin seeded per step. Both lists hold the pairs in the
        same order, so the step's batch (drawn by index) is the same texts either way."""
        mle = [e for e in examples if e.get("source") != "ditto"]
        ditto = [e for e in examples if e.get("source") == "ditto"]
        coin = random.Random(seed).random() < self.mle_probability
        self.mode = "mle" if (coin and mle) or not ditto else "ditto"
        return mle if self.mode == "mle" else ditto

    def __call__(self, logps: Tensor, batch: dict, normalizer: float):
        # the batch says which view it is (only DITTO rows carry rep_len), so a call without
        # step_examples (a test, an evaluation) still computes the matching loss
        if "rep_len" not in batch:
            loss, sft_metrics = self.mle(logps, batch, normalizer)
            return loss, {
                "ditto/mle_nll": sft_metrics["sft/nll"],
                "ditto/step_is_ditto": mean_metric(torch.zeros(1)),
            }
        # scope "sequence": column s holds token s + 1 of prompt + completion, so the same token one
        # copy earlier sits rep_len columns before, inside the row (the prompt holds the first copy)
        mask = batch["completion"]
        rows, cols = mask.nonzero(as_tuple=True)
        metrics = {"ditto/step_is_ditto": mean_metric(torch.ones(1))}
        if rows.numel() == 0:
            return logps.sum() * 0.0, metrics
        prev = cols - batch["rep_len"].to(cols.device).long()[rows]
        inside = (prev >= 0) & batch["scored"][rows, prev.clamp(min=0)]
        tokens = batch["tokens"]
        if not bool((inside & (tokens[rows, prev.clamp(min=0)] == tokens[rows, cols])).all()):
            raise ValueError("ditto: a penalised token is not the same token rep_len positions earlier")
        p = logps[rows, cols].exp()
        p_prev = logps[rows, prev].detach().exp()  # sg(·): the current model's probability one copy earlier
        per_token = torch.zeros_like(logps)
        per_token[rows, cols] = -torch.log((1.0 - (p - self.lam * p_prev).abs()).clamp(min=1e-5))
        metrics.update(
            {
                "ditto/loss": mean_metric(per_token[rows, cols]),
                "ditto/p_repeat": mean_metric(p),
                "ditto/p_prev": mean_metric(p_prev),
            }
        )
        return self.reduce(per_token, batch, normalizer), metrics
