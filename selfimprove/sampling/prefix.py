"""Prefill sharing: the key/value cache of a batch of prompts, each shared token computed once.

A round samples n completions of every prompt, and every prompt starts with the same chat-template
system turn: of the default recipe's ≈ 46 prompt tokens, 27 are common to all prompts and the rest
repeat n times. `prompt_cache` runs the common prefix once, each distinct prompt's remainder once (its
last token included, so the first sampled token's distribution is computed once per prompt too), and
indexes the result out to the batch's rows. The layout is [common prefix | remainder, left-padded]: the
padding sits in the middle, masked, and positions count real tokens only (as generate derives them
from the attention mask), so every row sees exactly its own prompt.

Sampling decodes on the cache from the last prompt token's logits (`decode.sample`); scoring runs the
completions on it (`completion_logprobs`); the static path copies it into a static cache.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
from transformers import LlamaModel

# The KV cache's keyword and output field: transformers 5.2x renamed past_key_values to cache (the old
# name still works there, with a warning, until 5.40); older releases know only past_key_values.
CACHE = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


@dataclass
class PromptCache:
    cache: object  # a transformers DynamicCache over every row's whole prompt
    input_ids: torch.Tensor  # [rows, width]: the prompts, as cached (padding masked)
    attention_mask: torch.Tensor  # [rows, width]; 0 on the padding
    logits: torch.Tensor  # [rows, vocab]: each row's next-token logits after its prompt


def positions(attention: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Position ids counting real tokens only, as generate derives them from the attention mask."""
    return (offset + attention.cumsum(-1) - 1).clamp(min=0)


def left_pad(seqs: list[list[int]], pad: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask with every sequence ending at the right edge (of `width`)."""
    width = max(max(len(s) for s in seqs), width or 0)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def forward_inputs(input_ids: torch.Tensor, attention: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """Model inputs for a left-padded batch, with positions counted from each sequence's first token
    (as generate does), so models with absolute position embeddings see the same positions."""
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention.to(device),
        "position_ids": positions(attention).to(device),
    }


@torch.no_grad()
def plain_prefill(model, prompts: list[list[int]], pad: int) -> PromptCache:
    """Every row's whole prompt, left-padded, in one pass: nothing shared (the baseline, and the
    fallback when nothing is)."""
    ids, mask = left_pad(prompts, pad)
    device = next(model.parameters()).device
    out = model(**forward_inputs(ids, mask, device), use_cache=True, logits_to_keep=1)
    return PromptCache(getattr(out, CACHE), ids, mask, out.logits[:, -1])


@torch.no_grad()
def prompt_cache(model, prompts: list[list[int]], pad: int) -> PromptCache | None:
    """The shared cache of `prompts` (rows may repeat), or None when nothing is shared: every prompt
    distinct with no common prefix."""
    distinct = list(dict.fromkeys(tuple(p) for p in prompts))
    # every distinct prompt keeps at least its last token past the prefix: its logits come from there
    prefix = min(len(os.path.commonprefix(distinct)), min(len(p) for p in prompts) - 1)
    if len(distinct) == len(prompts) and prefix == 0:
        return None
    device = next(model.parameters()).device
    rest_ids, rest_mask = left_pad([list(p[prefix:]) for p in distinct], pad)

    cache = None
    if prefix:
        ids = torch.tensor([distinct[0][:prefix]], device=device)
        cache = getattr(model(input_ids=ids, use_cache=True, logits_to_keep=1), CACHE)
        cache.batch_repeat_interleave(len(distinct))
    mask = torch.cat([torch.ones(len(distinct), prefix, dtype=torch.long), rest_mask], dim=1)
    out = model(
        input_ids=rest_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions(rest_mask, prefix).to(device),
        **{CACHE: cache},
        use_cache=True,
        logits_to_keep=1,
    )
    # one row of the cache per prompt row, in the batch's order
    index = {p: i for i, p in enumerate(distinct)}
    rows = torch.tensor([index[tuple(p)] for p in prompts])
    cache = getattr(out, CACHE)
    cache.reorder_cache(rows.to(device))
    common = torch.tensor(distinct[0][:prefix], dtype=torch.long).expand(len(prompts), prefix)
    input_ids = torch.cat([common, rest_ids[rows]], dim=1)
    attention = torch.cat([torch.ones_like(common), rest_mask[rows]], dim=1)
    return PromptCache(cache, input_ids, attention, out.logits[rows.to(out.logits.device), -1])


@torch.no_grad()
def completion_logprobs(
    model, prompts: list[list[int]], completions: list[list[int]], pad: int
) -> list[list[float]] | None:
    """Per-token log-probs of each completion after its prompt, on the shared prompt cache; None when
    nothing is shared (the caller runs whole sequences)."""
    shared = prompt_cache(model, prompts, pad)
    if shared is None:
        return None
    device = next(model.parameters()).device
    width = max(len(c) for c in completions)
    ids = torch.full((len(completions), max(width, 1)), pad, dtype=torch.long)
    # right-padded: padding after a row's last token changes nothing before it
    for i, c in enumerate(completions):
        ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    logits = shared.logits[:, None]  # what predicts each completion's first token
    if width > 1:  # the rest: completion tokens but the last, on the cache
        tail_mask = (
            torch.arange(width - 1)[None] < torch.tensor([len(c) for c in completions])[:, None]
        ).long()
        attention = torch.cat([shared.attention_mask, tail_mask], dim=1)
        tail_positions = shared.attention_mask.sum(-1, keepdim=True) + torch.arange(width - 1)[None]
        tail = model(
            input_ids=ids[:, : width - 1].to(device),
            attention_mask=attention.to(device),
            position_ids=tail_positions.to(device),
            **{CACHE: shared.cache},
        ).logits
        logits = torch.cat([logits, tail.to(logits.device)], dim=1)
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_lp = logp.gather(2, ids[:, : logits.shape[1]].to(logp.device)[..., None])[..., 0].cpu()
    return [token_lp[i, : len(c)].tolist() for i, c in enumerate(completions)]
