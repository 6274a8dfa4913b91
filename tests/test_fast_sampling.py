"""The GPU sampling path, checked on the CPU: a static KV cache with bucketed shapes (compile off, and
once on) samples what the eager path samples: greedy, the same tokens and the same recorded log-probs,
self-certainty and entropy, padding rows and prompts of several lengths included."""

import pytest
import torch
from omegaconf import OmegaConf

from selfimprove import models
from selfimprove.config import ModelConfig
from selfimprove.sampling import HFSampler
from selfimprove.sampling.static import FinishRows, bucket, compile_mode, round_up
from selfimprove.tasks import ArithmeticTask

STATS = ("logprobs", "self_certainty", "entropy")


@pytest.fixture(scope="module")
def tiny():
    cfg = OmegaConf.structured(ModelConfig(kind="tiny"))
    model, tokenizer = models.load_model(cfg), models.load_tokenizer(cfg)
    with torch.no_grad():
        model.model.norm.weight.mul_(5.0)  # peaked logits, so greedy ties cannot hide an error
    return model, tokenizer


def _prompts(sampler: HFSampler, count: int, n: int = 1) -> list[list[int]]:
    """`count` distinct prompts, each `n` times; the last one longer: several widths in a batch."""
    task = ArithmeticTask()
    distinct = [sampler.encode(task.train_problem(i)) for i in range(count)]
    distinct[-1] = distinct[-1] + distinct[0][-5:]
    return [p for p in distinct for _ in range(n)]


def _assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a["completion_ids"] == b["completion_ids"]
        assert all(len(a[k]) == len(a["completion_ids"]) for k in STATS)  # every step recorded
        for key in STATS:
            torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), atol=1e-4, rtol=1e-4)


def test_buckets_and_modes():
    assert [bucket(n, 64) for n in (1, 3, 8, 9, 33, 64, 65, 130)] == [8, 8, 8, 16, 64, 64, 128, 192]
    assert bucket(40, 48) == 48 and bucket(3, 4) == 4  # never past the configured batch size
    assert [round_up(w, 32) for w in (1, 32, 33, 64)] == [32, 32, 64, 64]
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert compile_mode("auto", cpu) == (False, False) and compile_mode("auto", gpu, 128) == (True, True)
    assert compile_mode("auto", gpu, 6) == (False, False)  # short generations: compiling does not pay back
    assert compile_mode("static", cpu) == (True, False) and compile_mode(True, cpu) == (True, True)
    assert compile_mode(False, gpu) == (False, False)
    with pytest.raises(ValueError, match="sampler.compile: 'yes' is not auto"):
        HFSampler(None, compile="yes")


def test_padding_rows_sample_eos_at_once():
    scores = torch.randn(4, 10)
    out = FinishRows(first=2, eos=7)(None, scores.clone())
    assert torch.equal(out[:2], scores[:2])  # real rows untouched
    assert out[2:].argmax(-1).tolist() == [7, 7] and torch.isinf(out[2:, :7]).all()


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize(("count", "n"), [(3, 1), (3, 3)])  # 3 rows pad to 8, 9 rows to 16
def test_static_cache_greedy_equals_eager(tiny, count, n, share):
    model, tok = tiny
    eager = HFSampler(tok, compile="false")
    static = HFSampler(tok, compile="static", length_bucket=32, batch_size=16)
    static.share_prompts = share
    prompts = _prompts(eager, count, n)
    want = eager.generate(model, prompts, max_new_tokens=6, greedy=True)
    widths = []  # tokens per forward: the prefill's passes, then generate's, one token each
    hook = model.model.embed_tokens.register_forward_hook(
        lambda m, args, out: widths.append(args[0].shape[1])
    )
    try:
        got = static.generate(model, prompts, max_new_tokens=6, greedy=True)
    finally:
        hook.remove()
    _assert_same(got, want)
    prefill = 2 if share else 1  # shared: the common prefix, then each distinct prompt's rest
    assert all(w > 1 for w in widths[:prefill]) and widths[prefill:] == [1] * 6
    assert static.caches.shapes == {(bucket(len(prompts), 16), round_up(max(map(len, prompts)), 32) + 6)}


def test_static_cache_sampling_is_seeded(tiny):
    model, tok = tiny
    sampler = HFSampler(tok, compile="static", batch_size=16)
    prompts = _prompts(sampler, 3, 2)
    one = sampler.generate(model, prompts, max_new_tokens=5, seed=7)
    two = sampler.generate(model, prompts, max_new_tokens=5, seed=7)
    other = sampler.generate(model, prompts, max_new_tokens=5, seed=8)
    assert [r["completion_ids"] for r in one] == [r["completion_ids"] for r in two]
    assert [r["logprobs"] for r in one] == [r["logprobs"] for r in two]
    assert [r["completion_ids"] for r in one] != [r["completion_ids"] for r in other]


def test_one_token_prompts_fall_back_to_generates_own_static_cache(tiny):
    model, tok = tiny
    prompts = [[tok.eos_token_id], [5]]
    want = HFSampler(tok, compile="false").generate(model, prompts, max_new_tokens=4, greedy=True)
    static = HFSampler(tok, compile="static")
    _assert_same(static.generate(model, prompts, max_new_tokens=4, greedy=True), want)
    assert not static.caches.shapes  # nothing to prefill: generate made its cache


def test_cache_shapes_stay_within_the_buckets(tiny):
    """Calls of 1..16 rows and prompts of 30..80 tokens: rows bucket to {8, 16}, widths to {32, 64, 96}
    at most, and each shape's cache is the same object from call to call."""
    model, tok = tiny
    sampler = HFSampler(tok, compile="static", length_bucket=32, batch_size=16)
    base = _prompts(sampler, 4)
    filler = base[0][5:40]
    widths = set()
    for rows, extra in [(1, 0), (3, 0), (5, 20), (8, 0), (9, 35), (12, 0), (16, 10), (2, 35), (7, -10)]:
        prompts = [(base[i % 4] + filler)[: len(base[i % 4]) + extra] for i in range(rows)]
        widths.add(round_up(max(map(len, prompts)), 32))
        first = dict(sampler.caches.caches)
        sampler.generate(model, prompts, max_new_tokens=2, greedy=True)
        assert all(sampler.caches.caches[k] is c for k, c in first.items())  # reused, not re-made
    shapes = sampler.caches.shapes
    assert {r for r, _ in shapes} <= {8, 16} and {length - 2 for _, length in shapes} <= widths
    assert len(shapes) <= 2 * len(widths) <= 6


def test_compiled_on_cpu_equals_eager_and_reuses_its_graph(tiny):
    """torch.compile for real (on the CPU: seconds for the tiny model); a second call with another
    batch size and prompt width in the same buckets compiles nothing new."""
    from torch._dynamo.utils import counters

    model, tok = tiny
    torch._dynamo.reset()
    compiled = HFSampler(tok, compile="true", length_bucket=64, batch_size=8)
    eager = HFSampler(tok, compile="false")
    prompts = _prompts(eager, 4)
    want = eager.generate(model, prompts, max_new_tokens=4, greedy=True)
    _assert_same(compiled.generate(model, prompts, max_new_tokens=4, greedy=True), want)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    again = compiled.generate(model, prompts[:3], max_new_tokens=4, greedy=True)  # 3 rows, narrower
    assert counters["stats"]["unique_graphs"] == graphs  # the same shape: no recompilation
    _assert_same(again, want[:3])
    torch._dynamo.reset()
