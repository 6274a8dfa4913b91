"""The eager sampling loop, on a prefilled prompt cache (`prefix.prompt_cache` or `plain_prefill`).

It does what generate's sampling loop does — logits / temperature, cut by top-p, softmax, multinomial
(argmax when greedy), stop at EOS — with three differences that matter on a CPU, where each forward
costs in proportion to its rows × tokens: the first token is sampled from the prefill's logits (one
per distinct prompt when prompts are shared, not one forward per row), a row that has sampled EOS
leaves the batch (its cache rows dropped), and each step's statistics are recorded in the same pass:
the log-prob of the sampled token under the distribution that sampled it, the model's own
self-certainty and entropy (`token_stats` of the untempered logits).
"""

from __future__ import annotations

import math

import torch
from transformers import TopPLogitsWarper

from selfimprove.sampling.prefix import CACHE, PromptCache

STATS = ("logprobs", "self_certainty", "entropy")


def token_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position (log_probs, self_certainty, entropy) from raw logits ``[..., V]``.

    Called on every decoding step, so it does a single log_softmax. Everything is fp32:
    bf16 log-probs are too coarse for a mean over a 150k vocab. V is ``logits.shape[-1]``
    (the padded config vocab the model actually normalises over), not ``len(tokenizer)``.
    Pass untempered, unfiltered logits: a ``-inf`` entry makes KL(U||p) infinite.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    vocab = logits.shape[-1]
    self_certainty = -log_probs.mean(dim=-1) - math.log(vocab)
    # entr(p) = -p log p with entr(0) = 0, so masked (-inf) logits do not give nan
    entropy = torch.special.entr(log_probs.exp()).sum(dim=-1)
    return log_probs, self_certainty, entropy


def sampling_logprobs(
    scores: torch.Tensor, model_logprobs: torch.Tensor, temperature: float, top_p: TopPLogitsWarper | None
) -> torch.Tensor:
    """Log-probs of the distribution that samples: the logits divided by the temperature and cut by
    top-p, as generate's warpers do (the model's own where neither applies)."""
    if temperature == 1.0 and top_p is None:
        return model_logprobs
    warped = scores.float() / temperature
    if top_p is not None:
        warped = top_p(None, warped)
    return torch.log_softmax(warped, dim=-1)


@torch.no_grad()
def sample(
    model,
    prefilled: PromptCache,
    *,
    max_new_tokens: int,
    eos: int | None,
    pad: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    record: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sampled tokens [rows, max_new_tokens] (`pad` after a row's EOS) and, if record, each of
    `STATS` as [rows, max_new_tokens] fp32 on the CPU (0 after a row's EOS). Seeded by torch's global
    generator, like generate."""
    logits = prefilled.logits
    device = logits.device
    rows = logits.shape[0]
    cut = TopPLogitsWarper(top_p) if top_p < 1.0 and not greedy else None
    temperature = 1.0 if greedy else temperature
    tokens = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
    stats = {k: torch.zeros(rows, max_new_tokens, device=device) for k in STATS} if record else {}
    active = torch.arange(rows, device=device)  # the rows still sampling, in the cache's order
    attention = prefilled.attention_mask.to(device)
    cache = prefilled.cache
    for step in range(max_new_tokens):
        scores = logits.float()
        if record or not greedy:  # greedy evaluation needs only the argmax
            model_logprobs, certainty, entropy = token_stats(scores)
            logprobs = sampling_logprobs(scores, model_logprobs, temperature, cut)
        chosen = scores.argmax(-1) if greedy else torch.multinomial(logprobs.exp(), num_samples=1)[:, 0]
        tokens[active, step] = chosen
        if record:
            stats["logprobs"][active, step] = logprobs.gather(1, chosen[:, None])[:, 0]
            stats["self_certainty"][active, step] = certainty
            stats["entropy"][active, step] = entropy
        if step == max_new_tokens - 1:
            break
        going = chosen != eos if eos is not None else torch.ones_like(chosen, dtype=torch.bool)
        if not going.all():  # finished rows leave the batch: later steps cost only the rows still going
            if not going.any():
                break
            keep = going.nonzero()[:, 0]
            active, chosen, attention = active[keep], chosen[keep], attention[keep]
            cache.batch_select_indices(keep)
        attention = torch.cat([attention, attention.new_ones(len(active), 1)], dim=1)
        logits = model(
            input_ids=chosen[:, None],
            attention_mask=attention,
            position_ids=attention.sum(-1, keepdim=True) - 1,
            **{CACHE: cache},
            use_cache=True,
        ).logits[:, -1]
    return tokens.cpu(), {k: v.float().cpu() for k, v in stats.items()}
