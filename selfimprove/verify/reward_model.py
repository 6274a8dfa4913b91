"""A trained reward model as a scorer: any transformers sequence classifier, from a local folder.

The problem and the sampled answer are rendered the way such models are trained (the RM's own chat
template, user turns then an assistant turn), and the chosen logit is the score. The model is loaded
by the engine on first use, never when the config is built, so a config check stays cheap.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from selfimprove.stages import Context, Scorer


def last_user_turn(messages: list[dict]) -> str:
    """The question: the content of the last user message ("" if there is none)."""
    return next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")


class RewardModel(Scorer):
    """Scorer: logit ``label`` of the sequence classifier at ``path`` on (problem, answer).

    ``chat``: the problem's messages plus an assistant turn ``prefill + completion`` through the RM
    tokenizer's chat template when it has one; otherwise (or ``chat=False``) ``question\\nanswer``.
    Longer inputs keep their last ``max_length`` tokens (the answer matters more than the system
    prompt), and a leading special token (BOS/CLS) is kept. Padding is ours, on the right, with
    ``config.pad_token_id``, so a causal RM sees its real tokens at unchanged positions and pools
    the same last non-pad token as transformers does on the unpadded text.
    """

    def __init__(
        self,
        path: str,
        label: int = 0,
        chat: bool = True,
        max_length: int = 1024,
        name: str = "reward_model",
    ) -> None:
        folder = Path(str(path)).expanduser()
        if not folder.is_dir():
            raise ValueError(f"reward model path {path}: no such folder")
        if not (folder / "config.json").exists():
            raise ValueError(f"reward model path {path}: not a transformers model folder (no config.json)")
        if label < 0:
            raise ValueError(f"label must be a non-negative logit index, got {label}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.path = str(path)
        self.label = label
        self.chat = chat
        self.max_length = max_length
        self.name = name
        self.reads = ("messages", "prefill", "completion")

    def render(self, row: dict, tokenizer: Any) -> list[int]:
        """The token ids the RM reads for one row (before truncation)."""
        answer = row.get("prefill", "") + row["completion"]
        if self.chat and getattr(tokenizer, "chat_template", None):
            turns = [*row["messages"], {"role": "assistant", "content": answer}]
            text = tokenizer.apply_chat_template(turns, tokenize=False)
            return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template has BOS
        return tokenizer(f"{last_user_turn(row['messages'])}\n{answer}")["input_ids"]

    def truncate(self, ids: list[int], tokenizer: Any) -> list[int]:
        if len(ids) <= self.max_length:
            return ids
        if ids[0] in set(tokenizer.all_special_ids):
            return ids[:1] + ids[len(ids) - self.max_length + 1 :]
        return ids[len(ids) - self.max_length :]

    @staticmethod
    def pad_id(model: Any, tokenizer: Any) -> int | None:
        """The pad id the classifier pools by, set on its config when missing (else batches of >1
        are refused by transformers); None when the tokenizer has neither pad nor eos."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if config.pad_token_id is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            if pad is None:
                return None
            config.pad_token_id = model.config.pad_token_id = pad
        return config.pad_token_id

    def forward(self, model: Any, batch: list[list[int]], pad: int) -> list[float]:
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, seq in enumerate(batch):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        device = next(model.parameters()).device
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        if self.label >= logits.shape[-1]:
            raise ValueError(f"reward model {self.path} has {logits.shape[-1]} logits; label={self.label}")
        return logits[:, self.label].float().tolist()

    @torch.no_grad()
    def score(self, rows: list[dict], ctx: Context) -> list[float]:
        model, tokenizer = ctx.classifier(self.path)
        start = time.perf_counter()  # the round's "forward" time, as the policy's scoring passes count
        try:
            return self._score(rows, model, tokenizer, ctx.batch_size)
        finally:
            ctx.timer["forward"] = ctx.timer.get("forward", 0.0) + time.perf_counter() - start

    def _score(self, rows: list[dict], model: Any, tokenizer: Any, batch_size: int) -> list[float]:
        inputs = [self.truncate(self.render(r, tokenizer), tokenizer) for r in rows]
        pad = self.pad_id(model, tokenizer)
        size = max(1, int(batch_size)) if pad is not None else 1  # no pad id: one at a time
        order = sorted(range(len(rows)), key=lambda i: len(inputs[i]))  # similar lengths, less padding
        out = [0.0] * len(rows)
        for s in range(0, len(order), size):
            chunk = order[s : s + size]
            for i, value in zip(chunk, self.forward(model, [inputs[i] for i in chunk], pad or 0)):
                out[i] = value
        return out
