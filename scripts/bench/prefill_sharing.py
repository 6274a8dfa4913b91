"""Prefill sharing, for sampling and for scoring: each prompt's shared tokens computed once
(`sampling/prefix.py`: the chat template's common prefix once per batch, each distinct prompt once,
repeated over its n samples) against computing every sample's whole prompt.

Sampling is timed three ways: *before*, the sampler as it was (transformers generate over every row's
whole left-padded prompt, the statistics recorded by `StatsRecorder`); our loop (`decode.sample`: the
first token from the prefill's logits, finished rows dropped) on every row's whole prompt; and our
loop on the shared prefill, which is what `HFSampler` does on a CPU now. The goal (≥ 3×) is before /
shared; per-sample / shared is what sharing alone gives.

The default recipes sample n = 8 completions of ≈ 6 tokens after a ≈ 46-token prompt (27 of them the
system turn every prompt shares), so without sharing most of sampling, and of scoring the samples under
the base model, is the prompt, eight times over. Sampling runs `HFSampler.generate` on the same unit
(the default task's first prompts, each repeated n times), the same seed and settings, and checks both
sample the same tokens (before draws other tokens: its random numbers are used differently; the
mean completion length of each is printed); scoring runs `sequence_logprobs` over those samples in batches of 64 (as
`Engine.logprobs` does) and checks the log-probs agree. Printed: tokens/s of each and their ratio, the
median over interleaved repeats (order alternating) after one warm-up each.

Device: --device (default: cuda when available, else cpu); on a GPU each timer is read after
torch.cuda.synchronize(), so a reading covers the kernels it launched.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench/prefill_sharing.py [--tiny] [--prompts 8] [--n 8]
      [--max-new-tokens 6] [--repeats 5] [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from generate_baseline import generate_with_recorder
from omegaconf import OmegaConf

from selfimprove import models
from selfimprove.config import ModelConfig
from selfimprove.sampling import hf
from selfimprove.tasks import ArithmeticTask


def clock(device: torch.device) -> float:
    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the time
        torch.cuda.synchronize(device)
    return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the random test model (a smoke test)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    cfg = OmegaConf.structured(ModelConfig(kind="tiny" if args.tiny else "embedded"))
    model, tokenizer = models.load_model(cfg).eval().to(device), models.load_tokenizer(cfg)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    sampler = hf.HFSampler(tokenizer, compile="false")  # the eager path, where prefill is shared
    task = ArithmeticTask()
    prompts = [sampler.encode(task.train_problem(i)) for i in range(args.prompts)]
    batch = [p for p in prompts for _ in range(args.n)]

    def sample_before() -> tuple[float, list[list[int]]]:
        t = clock(device)
        completions = generate_with_recorder(model, tokenizer, batch, args.max_new_tokens)
        return clock(device) - t, completions

    def sample(shared: bool) -> tuple[float, list[dict]]:
        sampler.share_prompts = shared
        t = clock(device)
        rows = sampler.generate(model, batch, max_new_tokens=args.max_new_tokens, seed=0)
        return clock(device) - t, rows

    _, before = sample_before()  # warm-ups, and the check that per-sample and shared sample the same
    _, want = sample(False)
    _, got = sample(True)
    completions = [r["completion_ids"] for r in want]

    def score(shared: bool) -> tuple[float, list[list[float]]]:
        t, out = clock(device), []
        for s in range(0, len(batch), 64):  # Engine.logprobs' batches
            part = slice(s, s + 64)
            out += hf.sequence_logprobs(model, batch[part], completions[part], tokenizer.pad_token_id, shared)
        return clock(device) - t, out

    _, plain = score(False)
    _, shared = score(True)
    same = sum(a["completion_ids"] == b["completion_ids"] for a, b in zip(want, got))
    gap = max(abs(x - y) for a, b in zip(plain, shared) for x, y in zip(a, b))
    tokens = sum(len(c) for c in completions)
    prompt_len = statistics.mean(len(p) for p in prompts)
    print(f"{args.prompts} prompts × n={args.n}, prompt ≈ {prompt_len:.0f} tokens, {tokens} sampled tokens")
    print(f"identical samples per-sample vs shared: {same}/{len(want)}; scoring log-probs agree to {gap:.1e}")
    lengths = [statistics.mean(map(len, c)) for c in (before, completions)]
    print("mean completion tokens: before {:.2f}, our loop {:.2f}".format(*lengths))
    modes = {
        "sampling": {
            "before: generate, per sample": sample_before,
            "prefill per sample": lambda: sample(False),
            "prefill shared": lambda: sample(True),
        },
        "scoring": {"prefill per sample": lambda: score(False), "prefill shared": lambda: score(True)},
    }
    for name, runs in modes.items():
        seconds = {label: [] for label in runs}
        ratios = {label: [] for label in runs if label != "prefill shared"}
        for i in range(args.repeats):
            order = list(runs) if i % 2 else list(reversed(runs))
            timed = {label: runs[label]()[0] for label in order}
            for label, s in timed.items():
                seconds[label].append(s)
            for label in ratios:
                ratios[label].append(timed[label] / timed["prefill shared"])
        for label in runs:
            s = statistics.median(seconds[label])
            count = sum(map(len, before)) if label.startswith("before") else tokens  # what it sampled
            print(f"{name:>8} {label:>28}: {s:6.2f} s  {count / s:7.1f} completion tokens/s")
        for label, r in ratios.items():
            print(
                f"{name:>8} speed-up ({label} / shared), median of {args.repeats}: {statistics.median(r):.2f}×"
            )


if __name__ == "__main__":
    main()
