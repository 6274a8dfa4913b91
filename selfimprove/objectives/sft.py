"""Supervised fine-tuning objective on selected samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def masked_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of token NLL, number of scored tokens) for causal-LM ``logits [B,T,V]``.

    ``logits[:, t]`` predicts ``labels[:, t+1]``, so both are shifted by one here; labels of
    -100 (prompt, padding) are ignored. Returning the sum and the count rather than a mean
    lets the caller normalise by the total token count across micro-batches, which a mean of
    means gets wrong. Only the scored positions are upcast to fp32, which saves memory when
    the prompt is long.
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


class SFT:
    """Objective: token-level NLL of ``batch["labels"]``.

    Returns (loss_sum, n_tokens, metrics); metrics hold detached tensors so logging does not
    force a device sync on every micro-batch.
    """

    name: str = "sft"

    def __call__(self, logits: Tensor, batch: dict) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        loss_sum, n_tokens = masked_nll(logits, batch["labels"])
        metrics = {
            "sft/nll_sum": loss_sum.detach(),
            "sft/n_tokens": n_tokens.detach().to(torch.float32),
        }
        return loss_sum, n_tokens, metrics
