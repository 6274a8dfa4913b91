"""The task's own documents as training rows: one language-modelling row per passage.

Used for plain SFT on a small fixed set of passages (Hyperfitting, Carlsson et al. 2412.04318: train to
near-zero loss, then decode greedily) and as the MLE half of DITTO (`selfimprove.select.ditto`, which
extends this selector with its pseudo-repetitive rows).
"""

from __future__ import annotations

from typing import Any

from selfimprove.stages import Context, Stage


def document_row(tokens: list[int], max_tokens: int) -> dict[str, list[int]]:
    """The passage's first token as the prompt (with no BOS it has nothing to be predicted from; in a
    left-padded batch it would be scored from a pad position), its next tokens up to `max_tokens` in
    all as the completion."""
    return {"prompt_ids": tokens[:1], "completion_ids": tokens[1:max_tokens]}


class TaskDocuments(Stage):
    """Selector: none of the samples; per text one row (`source` "real" for the task's documents,
    "policy" for samples) whose completion is the text's tokens after its first, cut at `max_tokens`.

    `source`: "task" — each distinct prompt's document, `prefill + target` (a text task splits a
    document so that prompt + continuation is the text); "samples" — each sample, `prefill +
    completion`. Train with `objective=sft`: the token NLL of the whole passage."""

    name = "documents"
    writes: tuple[str, ...] = ("source",)

    def __init__(self, source: str = "task", max_tokens: int = 128) -> None:
        if source not in ("task", "samples"):
            raise ValueError(f"source: {source!r} is not task|samples")
        if max_tokens < 4:
            raise ValueError(f"need max_tokens >= 4, got {max_tokens}")
        self.source, self.max_tokens = source, max_tokens
        self.reads = ("prefill", "target") if source == "task" else ("prefill", "completion")

    def check(self, task: Any) -> None:
        if self.source == "task" and not getattr(task, "open_ended", False):
            raise ValueError(
                f"selector {self.name} with source=task needs a text task (task=text); else source=samples"
            )

    def texts(self, rows: list[dict]) -> list[tuple[dict, str]]:
        """(a row of the text, the text): one per distinct prompt (task) or per sample (samples)."""
        if self.source == "samples":
            return [(r, (r.get("prefill") or "") + r["completion"]) for r in rows]
        seen, out = set(), []
        for r in rows:
            if r["prompt_id"] not in seen:
                seen.add(r["prompt_id"])
                out.append((r, (r.get("prefill") or "") + (r.get("target") or "")))
        return out

    @property
    def row_source(self) -> str:
        return "real" if self.source == "task" else "policy"

    def __call__(self, rows: list[dict], ctx: Context) -> list[dict]:
        out = []
        for row, text in self.texts(rows):
            tokens = ctx.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(tokens) < 2:  # nothing to predict after the first token
                continue
            common = {"prompt_id": row["prompt_id"], "correct": False, "source": self.row_source}
            out.append({**common, **document_row(tokens, self.max_tokens)})
        ctx.log("documents", len(out))
        ctx.log("document_tokens", sum(len(r["completion_ids"]) for r in out))
        return out
