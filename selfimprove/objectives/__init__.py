"""Training objectives (contract 3): `objective(logps, batch, normalizer) -> (loss, metrics)`."""

from selfimprove.objectives.base import Mix, Objective
from selfimprove.objectives.ditto import Ditto
from selfimprove.objectives.policy_gradient import PolicyGradient, clipped_surrogate, k3
from selfimprove.objectives.sft import SFT

__all__ = [
    "Ditto",
    "Mix",
    "Objective",
    "PolicyGradient",
    "SFT",
    "clipped_surrogate",
    "k3",
]
