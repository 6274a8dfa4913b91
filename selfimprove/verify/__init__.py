"""Verifiers: turn sampled rows into one float score per row."""

from selfimprove.verify.ground_truth import GroundTruth
from selfimprove.verify.loglik import SequenceLogLik
from selfimprove.verify.majority import MajorityAgreement
from selfimprove.verify.self_certainty import (
    SelfCertainty,
    borda_vote,
    response_logits,
    token_stats,
)

__all__ = [
    "GroundTruth",
    "MajorityAgreement",
    "SelfCertainty",
    "SequenceLogLik",
    "borda_vote",
    "response_logits",
    "token_stats",
]
