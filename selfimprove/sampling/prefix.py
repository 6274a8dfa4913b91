"""Prefill sharing: the key/value cache of a batch of prompts, each shared token computed once.

A round samples n completions of every prompt, and every prompt starts with the same chat-template
system turn: of the default recipe's ≈ 46 prompt tokens, 27 are common to all prompts and the rest
repeat n times. `PromptCache` runs the common prefix once, each distinct prompt's remainder once, and
indexes the result out to the batch's rows. The layout is [common prefix | remainder, left-padded |
last prompt token]: the padding sits in the middle, masked, and positions count real tokens only (as
generate derives them from the attention mask), so every row sees exactly its own prompt.

Sampling hands the cache to generate (which then runs only each row's last prompt token); scoring runs
[last prompt token + completion] on it (`completion_logprobs`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class PromptCache:
    cache: object  # a transformers DynamicCache over every row's prompt but its last token
    input_ids: torch.Tensor  # [rows, width]: prefix, padded remainder, last token
    attention_mask: torch.Tensor  # [rows, width]; 0 on the padding in the middle

    @property
    def cached(self) -> int:
        return self.input_ids.shape[1] - 1


def _positions(attention: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    return (offset + attention.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def prompt_cache(model, prompts: list[list[int]], pad: int) -> PromptCache | None:
    """The shared cache of `prompts` (rows may repeat), or None when nothing is shared: every prompt
    distinct and no common prefix, or one-token prompts."""
    shortest = min(len(p) for p in prompts)
    distinct = list(dict.fromkeys(tuple(p) for p in prompts))
    prefix = min(len(os.path.commonprefix(distinct)), shortest - 1)
    if shortest < 2 or (len(distinct) == len(prompts) and prefix == 0):
        return None
    device = next(model.parameters()).device
    rest = [list(p[prefix:-1]) for p in distinct]
    width = max(len(r) for r in rest)
    rest_ids = torch.full((len(distinct), width), pad, dtype=torch.long)
    rest_mask = torch.zeros_like(rest_ids)
    for i, r in enumerate(rest):
        if r:
            rest_ids[i, width - len(r) :] = torch.tensor(r)
            rest_mask[i, width - len(r) :] = 1

    cache = None
    if prefix:
        ids = torch.tensor([distinct[0][:prefix]], device=device)
        cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
        cache.batch_repeat_interleave(len(distinct))
    if width:
        mask = torch.cat([torch.ones(len(distinct), prefix, dtype=torch.long), rest_mask], dim=1)
        cache = model(
            input_ids=rest_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=_positions(rest_mask, prefix).to(device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).past_key_values
    # one row of the cache per prompt row, in the batch's order
    index = {p: i for i, p in enumerate(distinct)}
    rows = torch.tensor([index[tuple(p)] for p in prompts])
    cache.reorder_cache(rows.to(device))
    last = torch.tensor([[p[-1]] for p in prompts])
    common = torch.tensor(distinct[0][:prefix], dtype=torch.long).expand(len(prompts), prefix)
    input_ids = torch.cat([common, rest_ids[rows], last], dim=1)
    attention = torch.cat([torch.ones_like(common), rest_mask[rows], torch.ones_like(last)], dim=1)
    return PromptCache(cache, input_ids, attention)


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
    tails = [[p[-1], *c] for p, c in zip(prompts, completions)]
    width = max(len(t) for t in tails)
    ids = torch.full((len(tails), width), pad, dtype=torch.long)
    tail_mask = torch.zeros_like(ids)
    for i, t in enumerate(tails):  # right-padded: padding after a row's last token changes nothing before it
        ids[i, : len(t)] = torch.tensor(t)
        tail_mask[i, : len(t)] = 1
    context = shared.attention_mask[:, :-1]
    attention = torch.cat([context, tail_mask], dim=1)
    positions = context.sum(-1, keepdim=True) + torch.arange(width)[None]
    logits = model(
        input_ids=ids.to(device),
        attention_mask=attention.to(device),
        position_ids=positions.to(device),
        past_key_values=shared.cache,
    ).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_lp = logp.gather(2, ids[:, 1:].to(logp.device)[..., None])[..., 0].cpu()
    return [token_lp[i, : len(c)].tolist() for i, c in enumerate(completions)]
