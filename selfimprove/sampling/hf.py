"""Sampling with transformers models: batched, with per-token log-probs, self-certainty and entropy
captured from the logits the sampling already computed (no second pass)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from selfimprove.sampling import decode
from selfimprove.sampling.backtrack import Backtracker
from selfimprove.sampling.decode import token_stats
from selfimprove.sampling.prefix import (
    CACHE,
    completion_logprobs,
    forward_inputs,
    left_pad,
    plain_prefill,
    prompt_cache,
)
from selfimprove.sampling.static import (
    FinishRows,
    StaticCaches,
    bucket,
    compile_config,
    compile_mode,
    round_up,
)


class StatsRecorder(LogitsProcessor):
    """The static path's sampling step: warps the logits with the sampler's `warp` list (so generate
    samples from exactly the distribution the eager loop would) and records each step on the way.

    The sampler builds a GenerationConfig with no processors or warpers of its own (and keeps the
    model's saved generation defaults out: `neutral_generation_defaults`), so what this sees is the
    model's own distribution: self-certainty and entropy are the model's. The recorded log-probs are
    the policy's at the sampling temperature, before top-p / typical truncation
    (`decode.policy_logprobs`, as the eager loop records them): what the update's π is, so the
    PPO/GRPO ratio π/π_old is 1 on-policy. The sampled token's log-prob is only known at the next
    step (or after generate returns, for the last one), so one step's log-probs are kept: memory
    O(batch × vocab).
    """

    def __init__(self, warp: LogitsProcessorList, record: bool = True) -> None:
        self.warp, self.record = warp, record
        self.logprobs: list[torch.Tensor] = []
        self.self_certainty: list[torch.Tensor] = []
        self.entropy: list[torch.Tensor] = []
        self._prev: torch.Tensor | None = None

    def _take(self, tokens: torch.Tensor) -> None:
        if self._prev is not None:  # gather on the logits' device, wherever the tokens are
            self.logprobs.append(self._prev.gather(1, tokens.to(self._prev.device)[:, None])[:, 0])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        warped = self.warp(input_ids, scores) if self.warp else scores
        if not self.record:
            return warped
        if self.self_certainty:  # from the second step on, the last token was sampled by us
            self._take(input_ids[:, -1])
        model_logprobs, sc, ent = token_stats(scores)
        self._prev = decode.policy_logprobs(scores, model_logprobs, self.warp)
        self.self_certainty.append(sc)
        self.entropy.append(ent)
        return warped

    def finish(self, sequences: torch.Tensor) -> None:
        self._take(sequences[:, -1])
        self._prev = None

    def stacked(self) -> dict[str, torch.Tensor]:
        """[batch, steps] fp32 tensors on the CPU: stacked on the device, then one copy each."""
        return {
            k: torch.stack(getattr(self, k), dim=1).float().cpu()
            for k in ("logprobs", "self_certainty", "entropy")
        }


@contextlib.contextmanager
def neutral_generation_defaults(model: torch.nn.Module) -> Iterator[None]:
    """Within the context, generate takes nothing from the model's own generation_config.

    generate fills the fields our GenerationConfig leaves unset (transformers 5) or at the library's
    defaults (4.x) from `model.generation_config`, so a saved generation_config.json could add e.g.
    repetition_penalty or top_k to our decoding, and its processors would reshape what the recorder
    sees. Every module holding one gets a blank GenerationConfig (a peft wrapper holds none itself:
    it forwards to the transformers model inside, whose `generate` reads its own), restored after.
    """
    holders = [m for m in model.modules() if isinstance(vars(m).get("generation_config"), GenerationConfig)]
    saved = [m.generation_config for m in holders]
    try:
        for m in holders:
            m.generation_config = GenerationConfig()
        yield
    finally:
        for m, config in zip(holders, saved):
            m.generation_config = config


class HFSampler:
    """Builds prompts from chat messages and samples completions with transformers.

    Two ways to sample, picked per device by `sampler.compile`; either way each prompt's shared tokens
    are prefilled once (`prefix.prompt_cache`: the chat template's common prefix, then each distinct
    prompt, repeated over its samples):
    - eager (the CPU default): `decode.sample`, our loop on the dynamic KV cache, which samples the
      first token from the prefill's logits and drops rows as they finish. On a CPU every row-token
      costs, so these matter: prefill would be most of sampling.
    - static (the GPU default, compiled): transformers `generate` on a static KV cache, whose decoding
      step it runs through torch.compile; a GPU decodes eagerly at ≈ 40–58 steps/s on an H100 whatever
      the batch. Shapes are bucketed (`static.bucket`: rows to a power of two, with copies of the first
      prompt that are made to stop at once and dropped; the width to a multiple of `length_bucket`),
      and one cache per shape is kept (`static.StaticCaches`), so a run compiles a few shapes, not one
      per call. The shared prefill is copied into the static cache's layers; `StatsRecorder` sees
      every step's logits (it runs outside the compiled forward).
    """

    def __init__(
        self,
        tokenizer,
        max_prompt_tokens: int = 512,
        *,
        compile: str | bool = "auto",
        length_bucket: int = 32,
        batch_size: int = 64,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.compile = compile
        self.length_bucket = length_bucket
        self.batch_size = batch_size
        self.share_prompts = True  # prefill each prompt's shared tokens once (off: a benchmark's baseline)
        self.caches = StaticCaches()  # the static path's KV caches, one per bucketed shape
        compile_mode(compile, torch.device("cpu"))  # a bad setting fails at construction

    def encode(self, problem) -> list[int]:
        """The chat template with the assistant turn started by the prefill; a problem without messages
        (open-ended text) is its prefill alone, as a language model continues it."""
        text = ""
        if problem.messages:
            text = self.tokenizer.apply_chat_template(
                problem.messages, add_generation_prompt=True, tokenize=False
            )
        ids = self.tokenizer(text + problem.prefill, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_prompt_tokens:
            raise ValueError(
                f"problem {problem.id}: prompt is {len(ids)} tokens, longer than "
                f"sampler.max_prompt_tokens={self.max_prompt_tokens}"
            )
        return ids

    @torch.no_grad()
    def generate(
        self,
        model,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        greedy: bool = False,
        seed: int = 0,
        record: bool = True,
        backtrack: Backtracker | None = None,
        **sampling: float,
    ) -> list[dict]:
        """One completion per prompt (repeat a prompt to get several). `sampling`: the options of
        `decode.WARPERS` (temperature, top_p, typical_p). Returns one dict per prompt: completion_ids,
        completion text, `truncated` (no EOS within max_new_tokens), and (if record) per-token logprobs
        (of the policy at the sampling temperature, before top_p / typical_p truncation: what the
        update compares with), self_certainty and entropy (of the model's);
        with `backtrack` (the eager loop), its per-row counts (backtracks, query_cost, quota_spent).
        """
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and max(len(p) for p in prompts) + max_new_tokens > limit:
            raise ValueError(f"prompt + max_new_tokens exceeds the model's context of {limit} tokens")
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        warp = decode.warpers(greedy, **sampling)
        static, compiled = compile_mode(self.compile, next(model.parameters()).device, max_new_tokens)
        torch.manual_seed(seed)
        if static and backtrack is None:  # backtracking erases from the cache: the eager loop only
            new, stats = self._generate_static(model, prompts, max_new_tokens, compiled, warp, greedy, record)
        else:
            prefilled = (self.share_prompts and prompt_cache(model, prompts, pad)) or plain_prefill(
                model, prompts, pad
            )
            new, stats = decode.sample(
                model,
                prefilled,
                max_new_tokens=max_new_tokens,
                eos=eos,
                pad=pad,
                warp=warp,
                greedy=greedy,
                record=record,
                backtrack=backtrack,
            )
        counts = backtrack.results() if backtrack is not None else [{}] * len(prompts)
        rows = []
        for i in range(len(prompts)):
            ids = new[i].tolist()
            n = ids.index(eos) + 1 if eos in ids else len(ids)  # keep the EOS: it is a decision too
            row = {
                "completion_ids": ids[:n],
                "completion": self.tokenizer.decode(ids[:n], skip_special_tokens=True),
                "truncated": eos is None or eos not in ids,  # cut by max_new_tokens, not ended by the model
            }
            row.update({k: v[i, :n].tolist() for k, v in stats.items()})
            rows.append({**row, **counts[i]})
        return rows

    def _generate_static(
        self,
        model,
        prompts: list[list[int]],
        max_new_tokens: int,
        compiled: bool,
        warp: LogitsProcessorList,
        greedy: bool,
        record: bool,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """transformers generate on a static KV cache of a bucketed shape (compiled, or not: CPU tests);
        the recorder captures the statistics. Tokens [rows, steps] and stats on the CPU."""
        pad, eos, n_rows = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, len(prompts)
        device = next(model.parameters()).device
        gen_cfg = GenerationConfig(  # no warpers of its own: `warp` is applied by the recorder
            do_sample=not greedy,
            top_k=0 if not greedy else None,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
            disable_compile=not compiled,
            compile_config=compile_config(device) if compiled else None,
        )
        batch = prompts + [prompts[0]] * (bucket(n_rows, self.batch_size) - n_rows)
        filled = self.caches.fill(model, batch, pad, self.length_bucket, max_new_tokens, self.share_prompts)
        cache = None
        if filled is not None:
            cache, input_ids, attention = filled
        else:  # sliding-window layers or one-token prompts: generate fills its own static cache
            gen_cfg.cache_implementation = "static"
            input_ids, attention = left_pad(
                batch, pad, width=round_up(max(map(len, batch)), self.length_bucket)
            )
        finish = [FinishRows(n_rows, eos)] if len(batch) > n_rows and eos is not None else []
        recorder = StatsRecorder(warp, record) if record or warp else None
        width = input_ids.shape[1]
        with neutral_generation_defaults(model):
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                **{CACHE: cache},
                generation_config=gen_cfg,
                synced_gpus=False,  # each rank samples its own prompts on a whole model (ZeRO-3/FSDP too)
                logits_processor=LogitsProcessorList(([recorder] if recorder else []) + finish),
            )
        stats = {}
        if recorder and record:
            recorder.finish(out[:, width:])  # on the device, like the logits it gathers from
            stats = {k: v[:n_rows] for k, v in recorder.stacked().items()}
        return out[:n_rows, width:].cpu(), stats


# A scoring forward holds [rows, completion tokens, vocab] logits and their log-softmax: at most this
# many completion positions per forward (8192 × 49 152 fp32 logits ≈ 1.6 GB for SmolLM2), so 64 rows of
# 512 tokens are scored in parts instead of at once (≈ 13 GB a copy); short completions are unaffected.
LOGIT_POSITIONS = 8192


def logit_chunks(lengths: list[int], batch_size: int, budget: int = LOGIT_POSITIONS) -> list[slice]:
    """Consecutive slices of rows (completion `lengths`) to score one forward each: at most `batch_size`
    rows and at most `budget` padded positions (rows × the longest completion), one row at the least."""
    out: list[slice] = []
    start, longest = 0, 1
    for i, n in enumerate(lengths):
        wider = max(longest, n)
        if i > start and (i - start >= batch_size or (i - start + 1) * wider > budget):
            out.append(slice(start, i))
            start, wider = i, max(n, 1)
        longest = wider
    return out + [slice(start, len(lengths))] * bool(lengths)


def sequence_logprobs(
    model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad: int, share_prompts: bool = True
):
    """Per-token log-probs of given completions under `model`: on the shared prompt cache (each common
    prefix and distinct prompt computed once) where there is one, else one pass over whole sequences."""
    if share_prompts and (shared := completion_logprobs(model, prompt_ids, completion_ids, pad)) is not None:
        return shared
    seqs = [p + c for p, c in zip(prompt_ids, completion_ids)]
    input_ids, attention = left_pad(seqs, pad)
    device = next(model.parameters()).device
    keep = max(len(c) for c in completion_ids) + 1  # only the positions that predict completions
    with torch.no_grad():
        logits = model(**forward_inputs(input_ids, attention, device), logits_to_keep=keep).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    # the logits' device: the last layer's, which differs from the first's when a model is split
    targets = input_ids[:, input_ids.shape[1] - keep + 1 :].to(logp.device)
    token_lp = logp.gather(2, targets[..., None])[..., 0].cpu()
    return [token_lp[i, keep - 1 - len(c) :].tolist() for i, c in enumerate(completion_ids)]


@torch.no_grad()
def next_token_logprobs(
    model, prefix: list[int], suffixes: list[list[int]], candidates: list[int], pad: int, batch_size: int = 64
) -> list[list[float]]:
    """log p(candidate | prefix + suffix) for each suffix and candidate token.

    The prefix is run once and its key/value cache repeated across each batch of suffixes (P(True)
    judges the N answers of one question behind one long shared prompt). Suffixes are right-padded:
    padding after a sequence's last token cannot change what that token sees.
    """
    device = next(model.parameters()).device
    out: list[list[float]] = []
    if not prefix:
        raise ValueError("next_token_logprobs needs a non-empty prefix (an empty suffix is fine)")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and len(prefix) + max((len(x) for x in suffixes), default=0) > limit:
        raise ValueError(f"prefix + suffix exceeds the model's context of {limit} tokens")
    # only the last position's logits: a long few-shot prefix would otherwise hold length × vocab floats
    shared = model(input_ids=torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1)
    after_prefix = torch.log_softmax(shared.logits[0, -1].float(), dim=-1)[candidates].cpu()
    for s in range(0, len(suffixes), batch_size):
        chunk = suffixes[s : s + batch_size]
        lengths = torch.tensor([len(x) for x in chunk])
        if int(lengths.max()) == 0:
            out += [after_prefix.tolist() for _ in chunk]
            continue
        ids = torch.full((len(chunk), int(lengths.max())), pad, dtype=torch.long)
        for i, x in enumerate(chunk):
            ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        suffix_mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
        attention = torch.cat([torch.ones(len(chunk), len(prefix), dtype=torch.long), suffix_mask], dim=1)
        suffix_positions = len(prefix) + torch.arange(ids.shape[1])[None].expand(len(chunk), -1)
        cache = copy.deepcopy(getattr(shared, CACHE))
        cache.batch_repeat_interleave(len(chunk))
        # only each suffix's last position reaches the LM head: long suffixes (a chain of thought)
        # would otherwise hold rows × length × vocab logits
        ends = (lengths - 1).clamp(min=0)
        keep = torch.unique(ends)
        logits = model(
            input_ids=ids.to(device),
            attention_mask=attention.to(device),
            position_ids=suffix_positions.to(device),
            **{CACHE: cache},
            logits_to_keep=keep.to(device),
        ).logits
        last = logits[torch.arange(len(chunk)), torch.searchsorted(keep, ends).to(logits.device)]
        logp = torch.log_softmax(last.float(), dim=-1)[:, candidates].cpu()
        out += [after_prefix.tolist() if n == 0 else row.tolist() for n, row in zip(lengths.tolist(), logp)]
    return out
