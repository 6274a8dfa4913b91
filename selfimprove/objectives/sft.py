"""Supervised fine-tuning on the selected samples: the token NLL of their completions."""

from __future__ import annotations

from torch import Tensor

from selfimprove.objectives.base import Objective, mean_metric


class SFT(Objective):
    """−log π(y_t) of every completion token, token-mean over the step by default (a row's `weight`
    scales its tokens). `temperature` < or > 1 trains the softmax at that temperature (OSFT samples
    below it)."""

    name = "sft"

    def __call__(self, logps: Tensor, batch: dict, normalizer: float):
        nll = -logps
        return self.reduce(nll, batch, normalizer), {"sft/nll": mean_metric(nll[batch["completion"]])}
