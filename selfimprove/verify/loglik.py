"""Sequence log-likelihood self-reward (Huang et al. 2412.01951, SFT-Sharpening)."""

from __future__ import annotations

from selfimprove.stages import Context, Scorer
from selfimprove.verify.reference import attach_logprobs


class SequenceLogLik(Scorer):
    """Scorer: sum (or per-token mean) of the completion's token log-probs.

    ``source="base"`` scores under the frozen base model (the adapter switched off) -- what the
    sharpening paper scores with. Its per-token log-probs are kept as the ``ref_logprobs`` column,
    computed once per row whichever scorers read them (the KL to the base is logged from it).
    ``source="policy"`` reads ``row["logprobs"]`` recorded while sampling (no forward pass).
    The sum favours short answers; ``normalize=True`` gives the length-normalised variant.
    A row with no tokens scores -inf: there is nothing to score and it must never win BoN
    (a sum over zero tokens would otherwise be 0, the best possible log-prob).
    """

    def __init__(self, source: str = "base", normalize: bool = False) -> None:
        if source not in ("base", "policy"):
            raise ValueError(f"source must be 'base' or 'policy', got {source!r}")
        self.source = source
        self.normalize = normalize
        self.needs_reference = source == "base"
        self.reads = ("prompt_ids", "completion_ids") if source == "base" else ("logprobs",)
        self.key = "ref_logprobs" if source == "base" else "logprobs"

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"loglik_{self.source}" + ("_mean" if self.normalize else "")

    @property
    def writes(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.column, "ref_logprobs") if self.source == "base" else (self.column,)

    def __call__(self, rows: list[dict], ctx: Context) -> list[dict]:
        if self.source == "base":  # once per row, whichever base scorer (or the KL) asks first
            rows = attach_logprobs(rows, ctx, "base")
        return super().__call__(rows, ctx)

    def score(self, rows: list[dict], ctx: Context | None = None) -> list[float]:
        out = []
        for row in rows:
            if self.key not in row:
                raise KeyError(f"row lacks {self.key!r}; {self.name} needs it")
            lp = row[self.key]
            if len(lp) == 0:
                out.append(float("-inf"))
                continue
            total = float(sum(lp))
            out.append(total / len(lp) if self.normalize else total)
        return out
