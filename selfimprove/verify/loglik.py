"""Sequence log-likelihood self-reward (Huang et al. 2412.01951, SFT-Sharpening)."""

from __future__ import annotations


class SequenceLogLik:
    """Scorer: sum (or per-token mean) of the completion's token log-probs.

    ``source="base"`` reads ``row["base_logprobs"]`` -- the frozen base model, which is what
    the sharpening paper scores with -- and sets ``needs_base_logprobs`` so the loop runs
    the base forward pass. ``source="policy"`` reads ``row["logprobs"]`` from sampling.
    The sum favours short answers; ``normalize=True`` gives the length-normalised variant.
    A row with no tokens scores -inf: there is nothing to score and it must never win BoN
    (a sum over zero tokens would otherwise be 0, the best possible log-prob).
    """

    def __init__(self, source: str = "base", normalize: bool = False) -> None:
        if source not in ("base", "policy"):
            raise ValueError(f"source must be 'base' or 'policy', got {source!r}")
        self.source = source
        self.normalize = normalize
        self.needs_base_logprobs: bool = source == "base"

    @property
    def name(self) -> str:
        return f"loglik_{self.source}" + ("_mean" if self.normalize else "")

    def __call__(self, rows: list[dict]) -> list[float]:
        key = "base_logprobs" if self.source == "base" else "logprobs"
        out = []
        for row in rows:
            if key not in row:
                raise KeyError(f"row lacks {key!r}; {self.name} needs it (base forward pass?)")
            lp = row[key]
            if len(lp) == 0:
                out.append(float("-inf"))
                continue
            total = float(sum(lp))
            out.append(total / len(lp) if self.normalize else total)
        return out
