"""Reference log-probs: the per-token log-probs of each sampled completion under the frozen base
(`ref_logprobs`) or the EMA weights (`ema_logprobs`), computed once per row. The KL term of the
policy-gradient objective reads them; base-likelihood scorers share the base's."""

from __future__ import annotations

from selfimprove.stages import Context, Stage

COLUMN = {"base": "ref_logprobs", "ema": "ema_logprobs"}


def attach_logprobs(rows: list[dict], ctx: Context, weights: str) -> list[dict]:
    """The rows, each carrying its completion's log-probs under `weights`; rows that have them keep them."""
    column = COLUMN[weights]
    todo = [i for i, r in enumerate(rows) if column not in r]
    if not todo:
        return rows
    logprobs = ctx.logprobs(
        [rows[i]["prompt_ids"] for i in todo], [rows[i]["completion_ids"] for i in todo], weights
    )
    rows = list(rows)
    for i, lp in zip(todo, logprobs):
        rows[i] = {**rows[i], column: lp}
    return rows


class ReferenceLogprobs(Stage):
    """Stage: attach the base's (`weights: base`) or the EMA's (`weights: ema`) per-token log-probs."""

    reads = ("prompt_ids", "completion_ids")

    def __init__(self, weights: str = "base") -> None:
        if weights not in COLUMN:
            raise ValueError(f"weights must be one of {'|'.join(COLUMN)}, got {weights!r}")
        self.weights = weights
        self.name = f"reference_{weights}"
        self.writes = (COLUMN[weights],)
        self.needs_reference = weights == "base"
        self.uses_ema = weights == "ema"

    def __call__(self, rows: list[dict], ctx: Context) -> list[dict]:
        return attach_logprobs(rows, ctx, self.weights)
