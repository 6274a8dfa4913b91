"""On a CUDA GPU: what the sampler records matches a forward pass on the device, the compiled static
path samples what the eager path does, and the CLI trains the tiny recipe in fp32 and bf16. Every test
here is skipped on a machine without one."""

import json
import math

import pytest
import torch
from conftest import TINY, run_cli
from omegaconf import OmegaConf
from test_sampler import assert_recorded_stats_match, completion_logits, mixed_length_prompts

from selfimprove import models
from selfimprove.config import ModelConfig
from selfimprove.sampling import HFSampler, sequence_logprobs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def tiny_cuda():
    cfg = OmegaConf.structured(ModelConfig(kind="tiny"))
    return models.load_model(cfg).to("cuda"), models.load_tokenizer(cfg)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_recorded_stats_match_a_forward_pass_on_cuda(tiny_cuda, temperature):
    assert_recorded_stats_match(*tiny_cuda, temperature, max_new_tokens=6)


def test_greedy_on_cuda_is_the_argmax(tiny_cuda):
    model, tok = tiny_cuda
    sampler = HFSampler(tok)
    prompts = mixed_length_prompts(sampler)
    rows = sampler.generate(model, prompts, max_new_tokens=6, greedy=True)
    for p, row in zip(prompts, rows):
        logits = completion_logits(model, p, row["completion_ids"])
        chosen = logits.gather(1, torch.tensor(row["completion_ids"])[:, None])[:, 0]
        # the argmax at each step, up to GPU rounding between the cached and the one-pass logits
        assert (chosen >= logits.max(-1).values - 1e-4).all(), (chosen, logits.max(-1))


STATS = ("logprobs", "self_certainty", "entropy")


def assert_compiled_matches_eager(model, tok, max_new_tokens: int = 64) -> None:
    """sampler.compile=true (transformers' static cache, its decoding step under torch.compile) against
    our eager loop: the same greedy tokens and recorded statistics over `max_new_tokens`, and sampled
    log-probs equal to a plain forward pass at the temperature. On any device (the CPU checks the
    helper; the GPU, where `auto` takes this path at ≥ 64 tokens, is what it is for)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled = HFSampler(tok, compile="true", batch_size=8)
    eager = HFSampler(tok, compile="false")
    prompts = mixed_length_prompts(eager)
    want = eager.generate(model, prompts, max_new_tokens=max_new_tokens, greedy=True)
    got = compiled.generate(model, prompts, max_new_tokens=max_new_tokens, greedy=True)
    assert counters["stats"]["unique_graphs"] > 0 and compiled.caches.shapes  # it did compile
    assert [len(r["completion_ids"]) for r in want] == [max_new_tokens] * len(prompts)  # no early EOS
    for a, b in zip(got, want):
        assert a["completion_ids"] == b["completion_ids"]
        for key in STATS:  # compiled kernels sum in another order: agree to rounding
            torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), atol=1e-3, rtol=1e-4)
    rows = compiled.generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0.7, seed=1)
    for p, row in zip(prompts, rows):
        logp = torch.log_softmax(completion_logits(model, p, row["completion_ids"]) / 0.7, dim=-1)
        want_lp = logp.gather(1, torch.tensor(row["completion_ids"])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(row["logprobs"]), want_lp, atol=1e-3, rtol=1e-4)
    torch._dynamo.reset()


def test_compiled_static_path_matches_eager_on_cuda(tiny_cuda):
    _, tok = tiny_cuda
    model = models.load_model(OmegaConf.structured(ModelConfig(kind="tiny"))).to("cuda")
    with torch.no_grad():
        model.model.norm.weight.mul_(5.0)  # peaked logits: no near-tie for rounding to flip
    assert_compiled_matches_eager(model, tok, max_new_tokens=64)


def test_bf16_sampling_under_autocast_on_cuda(tiny_cuda):
    """What the engine does with model.dtype=bfloat16: bf16 weights, bf16 autocast."""
    _, tok = tiny_cuda  # the tokenizer; the model is loaded in bf16 below
    sampler = HFSampler(tok)
    prompts = mixed_length_prompts(sampler)
    bf16 = models.load_model(OmegaConf.structured(ModelConfig(kind="tiny", dtype="bfloat16"))).to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        rows = sampler.generate(bf16, prompts, max_new_tokens=6, seed=1)
        again = sequence_logprobs(bf16, prompts, [r["completion_ids"] for r in rows], tok.pad_token_id)
    for got, row in zip(again, rows):
        n = len(row["completion_ids"])
        assert len(row["logprobs"]) == len(row["self_certainty"]) == len(row["entropy"]) == n
        assert all(math.isfinite(x) for k in ("logprobs", "self_certainty", "entropy") for x in row[k])
        # bf16 rounds the cached and the one-pass computation differently: agree only roughly
        torch.testing.assert_close(torch.tensor(got), torch.tensor(row["logprobs"]), atol=0.1, rtol=0.02)


@pytest.mark.parametrize(
    ("dtype", "launcher"),
    [("float32", "ddp"), ("bfloat16", "ddp"), ("bfloat16", "zero3"), ("bfloat16", "fsdp2")],
)
def test_cli_trains_the_tiny_recipe_on_cuda(tmp_path, dtype, launcher):
    """Also ZeRO-3 and FSDP2 with a world of one (one GPU): a full tiny round, through the CLI."""
    if launcher == "zero3":
        pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    run_cli(["train", *TINY, f"model.dtype={dtype}", f"launcher={launcher}", f"run.dir={run_dir}"])
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = int(next(a.split("=", 1)[1] for a in TINY if a.startswith("loop.rounds=")))
    accuracy = {x["round"]: x["eval/accuracy"] for x in lines if "eval/accuracy" in x}
    assert set(range(1, rounds + 1)) <= set(accuracy), f"eval/accuracy only for rounds {sorted(accuracy)}"
    assert all(0.0 <= a <= 1.0 for a in accuracy.values())
    assert all(x["device"].startswith("cuda") for x in lines if "eval/accuracy" in x)
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    assert losses and all(math.isfinite(x) for x in losses), losses
