"""Log-probs and self-certainty captured during generation equal a separate forward pass."""

import pytest
import torch
from omegaconf import OmegaConf

from selfimprove import models
from selfimprove.config import ModelConfig
from selfimprove.sampling import HFSampler, sequence_logprobs
from selfimprove.tasks import ArithmeticTask
from selfimprove.verify.self_certainty import token_stats


@pytest.fixture(scope="module")
def tiny():
    cfg = OmegaConf.structured(ModelConfig(kind="tiny"))
    return models.load_model(cfg), models.load_tokenizer(cfg)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_recorded_stats_match_a_forward_pass(tiny, temperature):
    model, tok = tiny
    sampler = HFSampler(tok)
    task = ArithmeticTask()
    prompts = [sampler.encode(task.train_problem(i)) for i in range(3)]
    prompts = [prompts[0], prompts[1][:-2], prompts[2]]  # different lengths: left padding matters
    rows = sampler.generate(model, prompts, max_new_tokens=5, temperature=temperature, seed=1)
    for p, row in zip(prompts, rows):
        ids = torch.tensor([p + row["completion_ids"]])
        logits = model(input_ids=ids).logits[0, len(p) - 1 : len(p) - 1 + len(row["completion_ids"])]
        logp, sc, ent = token_stats(logits)
        want_lp = logp.gather(1, torch.tensor(row["completion_ids"])[:, None])[:, 0]
        # Recorded from the model's own distribution, before temperature reshapes it.
        torch.testing.assert_close(torch.tensor(row["logprobs"]), want_lp, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(row["self_certainty"]), sc, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(row["entropy"]), ent, atol=2e-4, rtol=1e-4)
    again = sequence_logprobs(model, prompts, [r["completion_ids"] for r in rows], tok.pad_token_id)
    for got, row in zip(again, rows):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(row["logprobs"]), atol=2e-4, rtol=1e-4)


def test_same_seed_same_samples(tiny):
    model, tok = tiny
    sampler = HFSampler(tok)
    prompts = [sampler.encode(ArithmeticTask().train_problem(0))] * 4
    a = sampler.generate(model, prompts, max_new_tokens=4, seed=7)
    b = sampler.generate(model, prompts, max_new_tokens=4, seed=7)
    assert [r["completion_ids"] for r in a] == [r["completion_ids"] for r in b]


def test_prompt_too_long_names_the_problem(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="problem train-0: prompt is"):
        HFSampler(tok, max_prompt_tokens=4).encode(ArithmeticTask().train_problem(0))
