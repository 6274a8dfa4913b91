"""Self-certainty (Kang et al. 2502.18581) and Borda voting over it.

Self-certainty of one next-token distribution p is KL(U || p) = -(1/V) sum_j log p_j - log V,
and a sequence's score is the mean over its generated tokens. It is >= 0, with 0 meaning
"uniform" (maximally unsure).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor


def token_stats(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-position (log_probs, self_certainty, entropy) from raw logits ``[..., V]``.

    Called on every decoding step, so it does a single log_softmax. Everything is fp32:
    bf16 log-probs are too coarse for a mean over a 150k vocab. V is ``logits.shape[-1]``
    (the padded config vocab the model actually normalises over), not ``len(tokenizer)``.
    Pass untempered, unfiltered logits: a ``-inf`` entry makes KL(U||p) infinite.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    vocab = logits.shape[-1]
    self_certainty = -log_probs.mean(dim=-1) - math.log(vocab)
    # entr(p) = -p log p with entr(0) = 0, so masked (-inf) logits do not give nan
    entropy = torch.special.entr(log_probs.exp()).sum(dim=-1)
    return log_probs, self_certainty, entropy


def response_logits(logits: Tensor, prompt_len: int, n: int) -> Tensor:
    """The ``n`` distributions that generated the response: ``logits[:, L-1 : L-1+n]``.

    Position t's logits predict token t+1, so response token y_1 (at index L) is predicted
    at index L-1 and y_n at L+n-2. The reference code slices ``[:, L:]``, which drops the
    distribution for y_1 and adds one *after* y_n -- an off-by-one against the paper.
    """
    if prompt_len < 1:
        raise ValueError("prompt_len must be >= 1 (something must predict the first token)")
    if n < 0 or prompt_len - 1 + n > logits.shape[1]:
        raise ValueError(f"n={n} response tokens do not fit in T={logits.shape[1]} positions")
    return logits[:, prompt_len - 1 : prompt_len - 1 + n]


class SelfCertainty:
    """Scorer: mean per-token self-certainty recorded during generation.

    An empty completion scores 0.0, the value of a uniform distribution, i.e. the least
    certain possible score -- it carries no evidence, and staying finite keeps logs valid.
    """

    name: str = "self_certainty"
    needs_base_logprobs: bool = False

    def __call__(self, rows: list[dict]) -> list[float]:
        out = []
        for row in rows:
            sc = row["self_certainty"]
            out.append(float(sum(sc) / len(sc)) if len(sc) > 0 else 0.0)
        return out


def borda_vote(answers: Sequence[Hashable | None], scores: Sequence[float], power: float) -> int:
    """Index of the earliest output carrying the Borda-winning answer.

    Outputs are ranked by score (rank 1 = highest; equal scores keep input order) and each
    adds (N - r + 1)^power to its answer's total; power = 0 is plain majority vote. ``None``
    answers (extraction failed) cannot win. Equal totals go to the answer seen first. If no
    output has an answer, returns the highest-scoring output.
    """
    n = len(answers)
    if n == 0 or n != len(scores):
        raise ValueError("answers and scores must be non-empty and of equal length")
    order = sorted(range(n), key=lambda i: -scores[i])  # stable: ties keep input order
    totals: dict[Hashable, float] = {}
    first_seen: dict[Hashable, int] = {}
    for i, a in enumerate(answers):
        if a is not None and a not in first_seen:
            first_seen[a] = i
            totals[a] = 0.0
    for rank0, i in enumerate(order):
        if answers[i] is not None:
            totals[answers[i]] += float(n - rank0) ** power  # rank r = rank0 + 1
    if not totals:
        return order[0]
    # max over answers in first-seen order: ties go to the earliest answer
    winner = max(first_seen, key=lambda a: (totals[a], -first_seen[a]))
    return first_seen[winner]
