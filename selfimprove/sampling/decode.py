"""The eager sampling loop, on a prefilled prompt cache (`prefix.prompt_cache` or `plain_prefill`).

It does what generate's sampling loop does — the logits through the sampling warpers (`warpers`:
temperature, top-p, typical), softmax, multinomial (argmax when greedy), stop at EOS — with three
differences that matter on a CPU, where each forward costs in proportion to its rows × tokens: the
first token is sampled from the prefill's logits (one per distinct prompt when prompts are shared, not
one forward per row), a row that has sampled EOS leaves the batch (its cache rows dropped), and each
step's statistics are recorded in the same pass: the log-prob of the sampled token under the policy
at the temperature it sampled with, before truncation (`policy_logprobs`: what the update's π is, so
an importance ratio is 1 on-policy), the model's own self-certainty and entropy (`token_stats` of the
unwarped logits).

With a `backtrack.Backtracker` it also erases: before each token a process verifier judges each row's
prefix, and a rejected row drops its last tokens and samples again from there (Botta et al.).
"""

from __future__ import annotations

import math

import torch
from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from selfimprove.sampling.prefix import CACHE, PromptCache

STATS = ("logprobs", "self_certainty", "entropy")

# The sampling options, in the order generate applies their warpers, each with the value that turns
# it off. A new option is one entry here (and one field of `SamplerConfig`).
WARPERS = {
    "temperature": (TemperatureLogitsWarper, 1.0),
    "top_p": (TopPLogitsWarper, 1.0),
    "typical_p": (TypicalLogitsWarper, 1.0),
}
# The warpers that reshape the policy (the update trains at the same temperature); the others truncate.
TEMPERING = (TemperatureLogitsWarper,)


def check_warper_options(options: dict, where: str = "sampler") -> None:
    """A clear error naming the key for a value no warper takes (at config time and per call)."""
    for key, value in options.items():
        if key not in WARPERS:
            raise ValueError(f"{where}.{key}: not a sampling option (known: {', '.join(WARPERS)})")
        if key == "temperature" and not value > 0:
            raise ValueError(f"{where}.temperature={value}: must be > 0 (greedy decoding is its own mode)")
        if key != "temperature" and not 0 < value <= 1:
            raise ValueError(f"{where}.{key}={value}: must be in (0, 1] (1 turns it off)")


def warpers(greedy: bool = False, **options: float) -> LogitsProcessorList:
    """The warpers that turn the model's logits into the distribution that samples: transformers' own
    classes, in generate's order; empty when greedy or every option is at its off value."""
    check_warper_options(options)
    if greedy:
        return LogitsProcessorList()
    return LogitsProcessorList(
        cls(options[key]) for key, (cls, off) in WARPERS.items() if options.get(key, off) != off
    )


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
    scores: torch.Tensor, model_logprobs: torch.Tensor, warp: LogitsProcessorList
) -> torch.Tensor:
    """Log-probs of the distribution that samples: the logits through `warp` (the model's own when
    nothing warps). The warpers ignore input_ids."""
    if not warp:
        return model_logprobs
    return torch.log_softmax(warp(None, scores.float()), dim=-1)


def policy_logprobs(
    scores: torch.Tensor,
    model_logprobs: torch.Tensor,
    warp: LogitsProcessorList,
    sampling: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probs of the policy that samples, as rows record them (`logprobs`): the logits at the
    sampling temperature, before truncation. top_p / typical_p only choose which tokens can be drawn;
    the update's π is the tempered softmax over the whole vocabulary (`Objective.temperature`), so
    π_old must be too: the truncated distribution's log-probs are higher by log(kept mass), which
    made the on-policy ratio the kept mass. `sampling`: `sampling_logprobs`' result,
    reused when nothing truncates."""
    tempering = LogitsProcessorList(w for w in warp if isinstance(w, TEMPERING))
    if not tempering:
        return model_logprobs
    if sampling is not None and len(tempering) == len(warp):  # nothing truncates: the same softmax
        return sampling
    return torch.log_softmax(tempering(None, scores.float()), dim=-1)


@torch.no_grad()
def sample(
    model,
    prefilled: PromptCache,
    *,
    max_new_tokens: int,
    eos: int | None,
    pad: int,
    warp: LogitsProcessorList,
    greedy: bool = False,
    record: bool = True,
    backtrack=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sampled tokens [rows, max_new_tokens] (`pad` after a row's EOS) and, if record, each of
    `STATS` as [rows, max_new_tokens] fp32 on the CPU (0 after a row's EOS; `logprobs` are
    `policy_logprobs`'). Seeded by torch's global generator, like generate. `backtrack`: a
    `backtrack.Backtracker` (its per-row counts are on it after the call)."""
    logits = prefilled.logits
    device = logits.device
    rows = logits.shape[0]
    tokens = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
    stats = {k: torch.zeros(rows, max_new_tokens, device=device) for k in STATS} if record else {}
    length = torch.zeros(rows, dtype=torch.long, device=device)  # tokens kept, per row
    active = torch.arange(rows, device=device)  # the rows still sampling, in the cache's order
    attention = prefilled.attention_mask.to(device)
    cache = prefilled.cache
    hidden = None  # the last fed token's hidden state, for a verifier that reads one
    if backtrack is not None:
        backtrack.start(rows, prefilled.input_ids[:, -1].to(device), attention.shape[1] - 1, pad)
    while True:
        feed = None
        if backtrack is not None:  # judge each prefix; erase where rejected; finished rows leave
            feed, attention = backtrack.step(
                active, tokens, stats, length, attention, hidden, max_new_tokens, eos
            )
            done = backtrack.finished(active, tokens, length, feed, max_new_tokens, eos)
            if done.any():
                keep = (~done).nonzero()[:, 0]
                if len(keep) == 0:
                    break
                active, feed, attention, logits = active[keep], feed[keep], attention[keep], logits[keep]
                cache.batch_select_indices(keep)
        sampling = torch.ones(len(active), dtype=torch.bool, device=device) if feed is None else feed < 0
        scores = logits[sampling].float()
        if record or not greedy:  # greedy evaluation needs only the argmax
            model_logprobs, certainty, entropy = token_stats(scores)
            logprobs = sampling_logprobs(scores, model_logprobs, warp)
        if record:
            recorded = policy_logprobs(scores, model_logprobs, warp, logprobs)
        chosen = scores.argmax(-1) if greedy else torch.multinomial(logprobs.exp(), num_samples=1)[:, 0]
        rows_now, at = active[sampling], length[active[sampling]]
        tokens[rows_now, at] = chosen
        if record:
            stats["logprobs"][rows_now, at] = recorded.gather(1, chosen[:, None])[:, 0]
            stats["self_certainty"][rows_now, at] = certainty
            stats["entropy"][rows_now, at] = entropy
        length[rows_now] += 1
        if feed is None:
            feed = chosen
        else:
            feed[sampling] = chosen
        if backtrack is None:  # finished rows leave the batch now: later steps cost only the rows going
            going = (length[active] < max_new_tokens) & (feed != eos if eos is not None else True)
            if not going.all():
                if not going.any():
                    break
                keep = going.nonzero()[:, 0]
                active, feed, attention = active[keep], feed[keep], attention[keep]
                cache.batch_select_indices(keep)
        else:
            backtrack.fed(active, sampling, length, attention.shape[1])
        attention = torch.cat([attention, attention.new_ones(len(active), 1)], dim=1)
        out = model(
            input_ids=feed[:, None],
            attention_mask=attention,
            position_ids=attention.sum(-1, keepdim=True) - 1,
            **{CACHE: cache},
            use_cache=True,
            output_hidden_states=backtrack is not None and backtrack.reads_hidden,
        )
        logits = out.logits[:, -1]
        if backtrack is not None and backtrack.reads_hidden:
            hidden = out.hidden_states[backtrack.layer][:, -1].float()
    if backtrack is not None:
        backtrack.lengths = length.cpu()
    return tokens.cpu(), {k: v.float().cpu() for k, v in stats.items()}
