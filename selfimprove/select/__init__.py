"""Selectors: stages that turn scored rows into training examples (rows in, rows out).

Each is built by ``hydra.utils.instantiate``, declares the columns it reads, and returns the rows to
train on: a subset (best-of-N, threshold, vote), or curated rows plus real data (curation).
The RL selectors (`GroupAdvantage`, SCoRe's) keep rows and add their advantage. Selecting nothing is legal and returns ``[]``; the loop decides what then.
"""

from selfimprove.select.advantage import GroupAdvantage, agreement
from selfimprove.select.curation import Curation, curated_update, curation_probs, plackett_luce
from selfimprove.select.ditto import DittoSequences, pseudo_repetitive, sentence_ends
from selfimprove.select.documents import TaskDocuments, document_row
from selfimprove.select.filters import BestOfN, GroundTruthFilter, Threshold
from selfimprove.select.score import SCoRe, shaped_reward
from selfimprove.select.vote import Borda, MajorityVote, borda_vote

__all__ = [
    "BestOfN",
    "Borda",
    "Curation",
    "DittoSequences",
    "GroundTruthFilter",
    "GroupAdvantage",
    "MajorityVote",
    "SCoRe",
    "TaskDocuments",
    "agreement",
    "Threshold",
    "borda_vote",
    "curated_update",
    "curation_probs",
    "document_row",
    "plackett_luce",
    "pseudo_repetitive",
    "sentence_ends",
    "shaped_reward",
]
