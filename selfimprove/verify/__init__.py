"""Verifiers: scorers, stages that add one `score/<name>` column to the round's rows."""

from selfimprove.verify.combined import Combined
from selfimprove.verify.ground_truth import GroundTruth, TaskReward
from selfimprove.verify.loglik import SequenceLogLik
from selfimprove.verify.majority import MajorityAgreement
from selfimprove.verify.ptrue import PTrue
from selfimprove.verify.reference import ReferenceLogprobs
from selfimprove.verify.reward_model import RewardModel
from selfimprove.verify.rewards import (
    EMATeacher,
    GradedReward,
    MajorityVoteReward,
    NegativeEntropy,
    graded_reward,
)
from selfimprove.verify.self_certainty import SelfCertainty, response_logits
from selfimprove.verify.views import CrossLabel, Harmony, ViewMajority

__all__ = [
    "Combined",
    "CrossLabel",
    "EMATeacher",
    "GradedReward",
    "GroundTruth",
    "Harmony",
    "MajorityAgreement",
    "MajorityVoteReward",
    "NegativeEntropy",
    "PTrue",
    "ReferenceLogprobs",
    "RewardModel",
    "SelfCertainty",
    "SequenceLogLik",
    "TaskReward",
    "ViewMajority",
    "graded_reward",
    "response_logits",
]
