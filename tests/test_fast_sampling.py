"""The GPU sampling path, checked on the CPU: a static KV cache with bucketed shapes samples what the
eager path samples (greedy: the same tokens, the same recorded log-probs, self-certainty, entropy)."""

import pytest
import torch
from omegaconf import OmegaConf

from selfimprove import models
from selfimprove.config import ModelConfig
from selfimprove.sampling import HFSampler
from selfimprove.sampling.hf import bucket, compile_mode
from selfimprove.tasks import ArithmeticTask


@pytest.fixture(scope="module")
def tiny():
    cfg = OmegaConf.structured(ModelConfig(kind="tiny"))
    model, tokenizer = models.load_model(cfg), models.load_tokenizer(cfg)
    with torch.no_grad():
        model.model.norm.weight.mul_(5.0)  # peaked logits, so greedy ties cannot hide an error
    return model, tokenizer


def _prompts(sampler: HFSampler, count: int) -> list[list[int]]:
    task = ArithmeticTask()
    distinct = [sampler.encode(task.train_problem(i)) for i in range(count)]
    distinct[-1] = distinct[-1] + distinct[0][-5:]  # one longer prompt: several widths in a batch
    return distinct


def test_buckets_and_modes():
    assert [bucket(n, 64) for n in (1, 3, 5, 33, 64, 80)] == [1, 4, 8, 64, 64, 80]
    assert bucket(40, 48) == 48  # never past the configured batch size (unless the batch is)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert compile_mode("auto", cpu) == (False, False) and compile_mode("auto", gpu) == (True, True)
    assert compile_mode("static", cpu) == (True, False) and compile_mode(False, gpu) == (False, False)
    with pytest.raises(ValueError, match="sampler.compile: 'yes' is not auto"):
        compile_mode("yes", cpu)


@pytest.mark.parametrize("count", [3, 5])  # 3 rows pad to a bucket of 4, 5 to 8
def test_static_cache_greedy_equals_eager(tiny, count):
    model, tok = tiny
    eager = HFSampler(tok, compile="false")
    static = HFSampler(tok, compile="static", length_bucket=16)
    prompts = _prompts(eager, count)
    want = eager.generate(model, prompts, max_new_tokens=6, greedy=True)
    got = static.generate(model, prompts, max_new_tokens=6, greedy=True)
    assert len(got) == count
    for a, b in zip(got, want):
        assert a["completion_ids"] == b["completion_ids"]
        for key in ("logprobs", "self_certainty", "entropy"):
            torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), atol=1e-4, rtol=1e-4)


def test_static_cache_sampling_is_seeded(tiny):
    model, tok = tiny
    sampler = HFSampler(tok, compile="static")
    prompts = [p for p in _prompts(sampler, 3) for _ in range(2)]
    one = sampler.generate(model, prompts, max_new_tokens=5, seed=7)
    two = sampler.generate(model, prompts, max_new_tokens=5, seed=7)
    assert [r["completion_ids"] for r in one] == [r["completion_ids"] for r in two]
    assert all(len(r["logprobs"]) == len(r["completion_ids"]) for r in one)


def test_compiled_on_cpu_equals_eager_and_reuses_its_graph_across_batch_sizes(tiny):
    """torch.compile for real (on the CPU: ≈ 20 s to compile the tiny model once)."""
    from torch._dynamo.utils import counters

    model, tok = tiny
    torch._dynamo.reset()
    compiled = HFSampler(tok, compile="true", length_bucket=64)
    eager = HFSampler(tok, compile="false")
    prompts = _prompts(eager, 4)
    got = compiled.generate(model, prompts, max_new_tokens=4, greedy=True)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    again = compiled.generate(model, prompts[:3], max_new_tokens=4, greedy=True)  # bucket 4 again
    assert counters["stats"]["unique_graphs"] == graphs  # no new shape, no recompilation
    want = eager.generate(model, prompts, max_new_tokens=4, greedy=True)
    assert [r["completion_ids"] for r in got] == [r["completion_ids"] for r in want]
    assert [r["completion_ids"] for r in again] == [r["completion_ids"] for r in want[:3]]
    torch._dynamo.reset()
