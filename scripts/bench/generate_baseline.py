"""The baseline the sampling benchmarks compare to: the eager sampler as it was before prefill sharing,
transformers `generate` over every row's whole left-padded prompt with `StatsRecorder` in it (the
issue's "eager transformers generate"). Not a benchmark itself: imported by prefill_sharing.py and
gpu_sampling.py."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessorList

from selfimprove.sampling import hf


def generate_with_recorder(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, seed: int = 0):
    """Completion ids per prompt (through the first EOS), sampled at temperature 1 with the statistics
    recorded and copied to the CPU, and the texts decoded: the work `HFSampler.generate` does."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = GenerationConfig(
        do_sample=True, top_k=0, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos
    )
    device = next(model.parameters()).device
    ids, mask = hf.left_pad(prompts, pad)
    recorder = hf.StatsRecorder()
    torch.manual_seed(seed)
    with torch.no_grad(), hf.neutral_generation_defaults(model):
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=config,
            logits_processor=LogitsProcessorList([recorder]),
        )
    new = out[:, ids.shape[1] :]
    recorder.finish(new)
    recorder.stacked()
    completions = [row[: row.index(eos) + 1] if eos in row else row for row in new.tolist()]
    tokenizer.batch_decode(completions, skip_special_tokens=True)
    return completions
