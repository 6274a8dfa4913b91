"""Supervised fine-tuning on the selected samples: the token NLL of their completions."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from selfimprove.objectives.base import IGNORE_INDEX, Objective


def masked_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of token NLL, number of scored tokens) for causal-LM ``logits [B,T,V]``.

    ``logits[:, t]`` predicts ``labels[:, t+1]``, so both are shifted by one here; labels of
    -100 (prompt, padding) are ignored. Only the scored positions are upcast to fp32, which saves
    memory when the prompt is long.
    """
    shift_logits = logits[:, :-1]
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    n_tokens = mask.sum()
    picked = shift_logits[mask].float()  # [N, V]
    if picked.shape[0] == 0:
        # keep the graph so backward() on an all-masked micro-batch is a harmless no-op
        return logits.sum() * 0.0, n_tokens
    loss_sum = F.cross_entropy(picked, shift_labels[mask], reduction="sum")
    return loss_sum, n_tokens


class SFT(Objective):
    """−log π(y_t) of every completion token, token-mean over the step by default.

    `temperature` < or > 1 trains the softmax at that temperature (OSFT samples below it)."""

    name = "sft"

    def __call__(self, logits: Tensor, batch: dict):
        if self.temperature == 1.0 and self.normalize == "token" and "weights" not in batch:
            loss_sum, n_tokens = masked_nll(logits, batch["labels"])  # the plain case, one fused call
            nll_sum = loss_sum.detach()
        else:
            logp, mask = self.token_logprobs(logits, batch)
            loss_sum = self.reduce(-logp, mask, batch) if logp.numel() else logits.sum() * 0.0
            n_tokens, nll_sum = mask.sum(), -logp.detach().sum()
        return loss_sum, self.normalizer([batch]), {"sft/nll": (nll_sum, n_tokens.detach().float())}
