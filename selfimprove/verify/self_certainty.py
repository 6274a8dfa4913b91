"""Self-certainty (Kang et al. 2502.18581); Borda voting over it is `selfimprove.select.Borda`.

Self-certainty of one next-token distribution p is KL(U || p) = -(1/V) sum_j log p_j - log V,
and a sequence's score is the mean over its generated tokens. It is >= 0, with 0 meaning
"uniform" (maximally unsure). The per-token values are recorded while sampling
(`selfimprove.sampling.decode.token_stats`), so this scorer needs no forward pass.
"""

from __future__ import annotations

from torch import Tensor

from selfimprove.stages import Context, Scorer


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


class SelfCertainty(Scorer):
    """Scorer: mean per-token self-certainty recorded during generation (no forward pass).

    An empty completion scores 0.0, the value of a uniform distribution, i.e. the least
    certain possible score -- it carries no evidence, and staying finite keeps logs valid.
    """

    name = "self_certainty"
    reads = ("self_certainty",)

    def score(self, rows: list[dict], ctx: Context | None = None) -> list[float]:
        out = []
        for row in rows:
            sc = row["self_certainty"]
            out.append(float(sum(sc) / len(sc)) if len(sc) > 0 else 0.0)
        return out
