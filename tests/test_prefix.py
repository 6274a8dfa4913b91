"""Prefill sharing: log-probs on the shared prompt cache (common prefix once, each distinct prompt
once, padding in the middle) equal whole-sequence passes, and sampling on it samples the same tokens."""

import contextlib

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


@contextlib.contextmanager
def forwards(model):
    """The [rows, tokens] of the ids every forward pass of `model` runs, in order (a hook on the
    embedding, which sees every token the model computes)."""
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda m, args, out: shapes.append(tuple(args[0].shape))
    )
    try:
        yield shapes
    finally:
        hook.remove()


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
    # what the model runs: the common prefix once, then each distinct prompt's rest once (left-padded
    # to the longest rest), then the completions but their last token on the cache, every row
    distinct = _prompts(tok, 1)
    prefix = next(i for i in range(len(distinct[0])) if len({p[i] for p in distinct}) > 1)
    assert prefix >= 10  # the chat template's system turn: worth sharing
    rest = max(len(p) for p in distinct) - prefix
    with forwards(model) as shapes:
        got = sequence_logprobs(model, prompts, completions, tok.pad_token_id)
    assert shapes == [(1, prefix), (len(distinct), rest), (len(prompts), 4 - 1)]
    want = sequence_logprobs(model, prompts, completions, tok.pad_token_id, share_prompts=False)
    for g, w in zip(got, want):
        assert len(g) == len(w)
        torch.testing.assert_close(torch.tensor(g), torch.tensor(w), atol=2e-5, rtol=1e-5)


def test_nothing_to_share_falls_back(tiny):
    model, tok = tiny
    with forwards(model) as shapes:
        assert prompt_cache(model, [[5, 6], [7, 8]], tok.pad_token_id) is None  # distinct, no common prefix
    assert shapes == []  # and nothing was run for it
    with forwards(model) as shapes:
        one_token = prompt_cache(model, [[5], [5]], tok.pad_token_id)  # one prompt twice
    assert shapes == [(1, 1)]  # computed once: one row of one token
    assert one_token is not None and one_token.input_ids.tolist() == [[5], [5]]
    assert one_token.logits.shape[0] == 2 and torch.equal(one_token.logits[0], one_token.logits[1])
