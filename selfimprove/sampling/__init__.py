"""Sampler backends. `hf` (transformers generate) runs everywhere; vLLM is a GPU-only extra."""

from selfimprove.sampling.hf import (
    HFSampler,
    StatsRecorder,
    left_pad,
    neutral_generation_defaults,
    sequence_logprobs,
)

__all__ = ["HFSampler", "StatsRecorder", "left_pad", "neutral_generation_defaults", "sequence_logprobs"]
