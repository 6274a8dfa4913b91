"""DITTO's data (Xu et al. 2022, "Learning to Break the Loop"): pseudo-repetitive rows.

A sentence of a real text is repeated until the sequence is `max_tokens` long. The selector
(`DittoSequences`) builds, per text, an MLE row and a DITTO row with the same `pair`; the objective
(`selfimprove.objectives.Ditto`) picks one of the two views per step.
"""

from __future__ import annotations

import random
from typing import Any

from selfimprove.select.documents import TaskDocuments, document_row
from selfimprove.stages import Context

SENTENCE_END = (".", "!", "?")  # the reference splits at '.' only; '!' and '?' end sentences too


def sentence_ends(ids: list[int], tokenizer: Any, cache: dict[int, bool] | None = None) -> list[int]:
    """Positions of the tokens whose decoded text, stripped, ends with '.', '!' or '?'.

    A token such as '."' (a closing quote) does not end one; 'Mr.' does (as in the reference, which
    splits at every '.'). `cache` maps an id to the answer and may be shared across calls: each
    distinct id is decoded once."""
    cache = {} if cache is None else cache
    out = []
    for pos, i in enumerate(ids):
        if i not in cache:
            cache[i] = tokenizer.decode([i]).strip().endswith(SENTENCE_END)
        if cache[i]:
            out.append(pos)
    return out


def pseudo_repetitive(
    ids: list[int], ends: list[int], rng: random.Random, max_tokens: int
) -> tuple[list[int], list[int], int] | None:
    """(prompt_ids, completion_ids, rep_len): a sentence of `ids` repeated up to `max_tokens` tokens.

    With sentence ends e_0 < e_1 < … and a random i in 1..n−2 (as the reference): the prefix is the
    sentence ending at e_i without its end token, ids[e_{i−1}+1 : e_i]; the unit is that end token plus
    the next sentence up to (not including) its own end, ids[e_i : e_{i+1}], so the copies read
    "prefix. S. S. S" with no doubled end token. The first copy is the prompt (unpenalised), copies
    2..k (the last truncated) the completion. None with fewer than 3 sentence ends, an empty prefix
    (the first copy's first token would have nothing to be predicted from), or under 2 whole copies."""
    if len(ends) < 3:
        return None
    i = rng.randint(1, len(ends) - 2)
    prefix, unit = list(ids[ends[i - 1] + 1 : ends[i]]), list(ids[ends[i] : ends[i + 1]])
    room = max_tokens - len(prefix)
    if not prefix or room < 2 * len(unit):
        return None
    tiled = (unit * (room // len(unit) + 1))[:room]
    return prefix + unit, tiled[len(unit) :], len(unit)


class DittoSequences(TaskDocuments):
    """Selector: each text becomes an MLE row (`TaskDocuments`' row: `source` "real", or "policy" for
    samples) and a DITTO row (`source` "ditto", with `rep_len`), `per_row` pairs per text, both with
    the same `pair`.

    `source`: "task" — each distinct prompt's document; "samples" — each sample's text (see
    `TaskDocuments`). A text whose draw gives no sequence is skipped (logged as `ditto_skipped`).
    Train these rows with the `ditto` objective only: plain SFT on them would learn the repetitions."""

    name = "ditto"
    writes = ("rep_len", "source", "pair")

    def __init__(self, source: str = "task", max_tokens: int = 128, per_row: int = 1) -> None:
        super().__init__(source, max_tokens)
        if per_row < 1:
            raise ValueError(f"need per_row >= 1, got {per_row}")
        self.per_row = per_row
        self._ends_cache: dict[int, bool] = {}  # id -> ends a sentence, for this tokenizer

    def __call__(self, rows: list[dict], ctx: Context) -> list[dict]:
        out: list[dict] = []
        skipped = 0
        for index, (row, text) in enumerate(self.texts(rows)):
            tokens = ctx.tokenizer(text, add_special_tokens=False)["input_ids"]
            ends = sentence_ends(tokens, ctx.tokenizer, self._ends_cache)
            rng = ctx.rng("ditto", index)
            for _ in range(self.per_row):
                built = pseudo_repetitive(tokens, ends, rng, self.max_tokens)
                if built is None:
                    skipped += 1
                    continue
                prompt, completion, rep_len = built
                common = {"prompt_id": row["prompt_id"], "correct": False, "pair": len(out) // 2}
                ditto_ids = {"prompt_ids": prompt, "completion_ids": completion, "rep_len": rep_len}
                out.append({**common, "source": self.row_source, **document_row(tokens, self.max_tokens)})
                out.append({**common, "source": "ditto", **ditto_ids})
        ctx.log("ditto_sequences", len(out) // 2)
        ctx.log("ditto_skipped", skipped)
        return out
