"""Repetition and diversity metrics of generated text, and perplexity (pure Python, no torch).

Token-level metrics take one sequence of tokens (ids or strings, anything hashable); they follow
Welleck et al. 2020 (rep-n), Fu et al. 2021 (rep-w, rep-r) as used by DITTO (Xu et al. 2022).
Every value is in [0, 1]; a sequence too short to measure gives 0.0.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence

# A sentence ends at . ! or ? followed by whitespace or the end of the text.
_SENTENCE_END = re.compile(r"(?<=[.!?])(?:\s+|$)")


def _ngrams(seq: Sequence[Hashable], n: int) -> list[tuple[Hashable, ...]]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def rep_n(seq: Sequence[Hashable], n: int) -> float:
    """rep-n = 1 - |unique n-grams| / |n-grams| of one sequence; 0.0 if it has no n-grams.

    E.g. [1, 2, 1, 2, 1, 2], n=2: 5 bigrams, 2 unique -> 1 - 2/5 = 0.6.
    """
    grams = _ngrams(seq, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def rep_w(seq: Sequence[Hashable], w: int = 16) -> float:
    """rep-w = (1/|s|) * #{t : s_t in {s_{t-w}, ..., s_{t-1}}}: the fraction of tokens that also
    occur among the previous ``w`` tokens (the first token never does); 0.0 for an empty sequence.

    E.g. [1, 2, 1, 3], w=2: only t=2 (1 is among [1, 2]) -> 1/4.
    """
    if w < 1:
        raise ValueError(f"w must be >= 1, got {w}")
    if not seq:
        return 0.0
    hits = sum(seq[t] in seq[max(0, t - w) : t] for t in range(1, len(seq)))
    return hits / len(seq)


def rep_r(seq: Sequence[Hashable]) -> float:
    """rep-r = (1/|s|) * #{i : token i lies in a repeated bigram}: a bigram (s_j, s_{j+1}) is
    repeated when it also occurs at some position k != j, and then both its tokens, i = j and
    i = j + 1, count (each position at most once). Equivalently, i counts when (s_i, s_{i+1}) or
    (s_{i-1}, s_i) occurs elsewhere. 0.0 for an empty sequence.

    E.g. [1, 2, 3, 1, 2]: (1, 2) occurs at 0 and 3, so positions {0, 1, 3, 4} count -> 4/5.
    """
    if not seq:
        return 0.0
    counts = Counter(_ngrams(seq, 2))
    inside: set[int] = set()
    for j, gram in enumerate(_ngrams(seq, 2)):
        if counts[gram] > 1:
            inside.update((j, j + 1))
    return len(inside) / len(seq)


def sentences(text: str) -> list[str]:
    """``text`` split after . ! or ? followed by whitespace or the end; stripped, empty ones dropped.
    Each sentence keeps its final punctuation."""
    return [s for part in _SENTENCE_END.split(text) if (s := part.strip())]


def rep_sen(text: str) -> float:
    """rep-sen = #{sentences that exactly repeat an earlier sentence} / #sentences (see
    :func:`sentences`); 0.0 for a text without sentences.

    E.g. "A b. A b. C d." -> the second "A b." repeats -> 1/3.
    """
    sents = sentences(text)
    return (len(sents) - len(set(sents))) / len(sents) if sents else 0.0


def distinct_n(seqs: Iterable[Sequence[Hashable]], n: int) -> float:
    """distinct-n = |unique n-grams over all sequences| / |n-grams over all sequences| (n-grams
    never cross two sequences); 0.0 if there are none.

    E.g. [[1, 2, 1], [2, 1]], n=1: 5 unigrams, 2 unique -> 2/5.
    """
    grams = [g for seq in seqs for g in _ngrams(seq, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def text_metrics(token_seqs: Sequence[Sequence[Hashable]], texts: Sequence[str]) -> dict[str, float]:
    """Metrics of a set of continuations: the means over continuations of rep-2, rep-3, rep-4,
    rep-w (w=16), rep-r (of ``token_seqs``) and rep-sen (of ``texts``), and distinct-1..4 over the
    whole set. ``texts[i]`` is the decoded text of ``token_seqs[i]``. All 0.0 for no continuations.
    """
    if len(token_seqs) != len(texts):
        raise ValueError(
            f"{len(token_seqs)} token sequences but {len(texts)} texts; pass one text per sequence"
        )
    count = len(token_seqs)

    def mean(values: Iterable[float]) -> float:
        return sum(values) / count if count else 0.0

    out = {f"rep_{n}": mean(rep_n(s, n) for s in token_seqs) for n in (2, 3, 4)}
    out["rep_w"] = mean(rep_w(s) for s in token_seqs)
    out["rep_r"] = mean(rep_r(s) for s in token_seqs)
    out["rep_sen"] = mean(rep_sen(t) for t in texts)
    out.update({f"distinct_{n}": distinct_n(token_seqs, n) for n in (1, 2, 3, 4)})
    return out


def perplexity(logprob_lists: Iterable[Iterable[float]]) -> float:
    """exp(-(sum of every token's log-probability) / (number of tokens)), pooled over sequences
    (a long sequence weighs more than a short one); ValueError if there are no tokens."""
    total, count = 0.0, 0
    for logprobs in logprob_lists:
        for lp in logprobs:
            total += float(lp)
            count += 1
    if count == 0:
        raise ValueError("perplexity of no tokens: every log-prob list is empty")
    return math.exp(-total / count)
