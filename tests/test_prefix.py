"""Prefill sharing: log-probs on the shared prompt cache (common prefix once, each distinct prompt
once, padding in the middle) equal whole-sequence passes, and sampling on it samples the same tokens."""

import pytest
import torch
from omegaconf import OmegaConf

from selfimprove import models
from selfimprove.config import ModelConfig
from selfimprove.sampling import HFSampler, sequence_logprobs
from selfimprove.sampling.prefix import prompt_cache
from selfimprove.tasks import ArithmeticTask


@pytest.fixture(scope="module")
def tiny():
    cfg = OmegaConf.structured(ModelConfig(kind="tiny"))
    model, tokenizer = models.load_model(cfg), models.load_tokenizer(cfg)
    with torch.no_grad():
        model.model.norm.weight.mul_(5.0)  # peaked logits: a position or mask error moves them far
    return model, tokenizer


def _prompts(tokenizer, n: int) -> list[list[int]]:
    """Prompts of different lengths (so the middle padding is exercised), each repeated n times."""
    sampler, task = HFSampler(tokenizer), ArithmeticTask()
    distinct = [sampler.encode(task.train_problem(i)) for i in range(4)]
    distinct.append(distinct[0] + tokenizer("  so", add_special_tokens=False)["input_ids"])  # longer
    return [p for p in distinct for _ in range(n)]


@pytest.mark.parametrize("n", [1, 3])
def test_shared_logprobs_equal_whole_sequences(tiny, n):
    model, tok = tiny
    prompts = _prompts(tok, n)
    completions = [[(7 * i + j) % 500 + 10 for j in range(1 + i % 4)] for i in range(len(prompts))]
    shared = prompt_cache(model, prompts, tok.pad_token_id)
    assert shared is not None and shared.cache.get_seq_length() == shared.input_ids.shape[1]
    assert sum(len(p) for p in prompts) > shared.input_ids.shape[0]  # something is shared
    got = sequence_logprobs(model, prompts, completions, tok.pad_token_id)
    want = sequence_logprobs(model, prompts, completions, tok.pad_token_id, share_prompts=False)
    for g, w in zip(got, want):
        assert len(g) == len(w)
        torch.testing.assert_close(torch.tensor(g), torch.tensor(w), atol=2e-5, rtol=1e-5)


def test_nothing_to_share_falls_back(tiny):
    model, tok = tiny
    assert prompt_cache(model, [[5, 6], [7, 8]], tok.pad_token_id) is None  # distinct, no common prefix
    one_token = prompt_cache(model, [[5], [5]], tok.pad_token_id)  # one prompt twice: computed once
    assert one_token is not None and one_token.input_ids.tolist() == [[5], [5]]
