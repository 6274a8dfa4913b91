"""Training objectives (contract 3): `objective(logits, batch) -> (loss_sum, normalizer, metrics)`."""

from selfimprove.objectives.base import Mix, Objective
from selfimprove.objectives.ditto import Ditto, DittoSequences, pseudo_repetitive, sentence_ends
from selfimprove.objectives.policy_gradient import PolicyGradient, clipped_surrogate, group_advantages, k3
from selfimprove.objectives.sft import SFT, masked_nll

__all__ = [
    "Ditto",
    "DittoSequences",
    "Mix",
    "Objective",
    "PolicyGradient",
    "SFT",
    "clipped_surrogate",
    "group_advantages",
    "k3",
    "masked_nll",
    "pseudo_repetitive",
    "sentence_ends",
]
