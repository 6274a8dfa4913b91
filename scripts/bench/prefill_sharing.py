"""Prefill sharing, for sampling and for scoring: each prompt's shared tokens computed once
(`sampling/prefix.py`: the chat template's common prefix once per batch, each distinct prompt once,
repeated over its n samples) against computing every sample's whole prompt.

The default recipes sample n = 8 completions of ≈ 6 tokens after a ≈ 46-token prompt (27 of them the
system turn every prompt shares), so without sharing most of sampling, and of scoring the samples under
the base model, is the prompt, eight times over. Sampling runs `HFSampler.generate` on the same unit
(the default task's first prompts, each repeated n times), the same seed and settings, and checks both
sample the same tokens; scoring runs `sequence_logprobs` over those samples in batches of 64 (as
`Engine.logprobs` does) and checks the log-probs agree. Printed: tokens/s of each and their ratio, the
median over interleaved repeats (order alternating) after one warm-up each.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench/prefill_sharing.py [--tiny] [--prompts 8] [--n 8]
      [--max-new-tokens 6] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from omegaconf import OmegaConf

from selfimprove import models
from selfimprove.config import ModelConfig
from selfimprove.sampling import hf
from selfimprove.tasks import ArithmeticTask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the random test model (a smoke test)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    cfg = OmegaConf.structured(ModelConfig(kind="tiny" if args.tiny else "embedded"))
    model, tokenizer = models.load_model(cfg).eval(), models.load_tokenizer(cfg)
    sampler = hf.HFSampler(tokenizer, compile="false")  # the eager path, where prefill is shared
    task = ArithmeticTask()
    prompts = [sampler.encode(task.train_problem(i)) for i in range(args.prompts)]
    batch = [p for p in prompts for _ in range(args.n)]

    def sample(shared: bool) -> tuple[float, list[dict]]:
        sampler.share_prompts = shared
        t = time.perf_counter()
        rows = sampler.generate(model, batch, max_new_tokens=args.max_new_tokens, seed=0)
        return time.perf_counter() - t, rows

    _, want = sample(False)  # warm-ups, and the check that both sample the same tokens
    _, got = sample(True)
    completions = [r["completion_ids"] for r in want]

    def score(shared: bool) -> tuple[float, list[list[float]]]:
        t, out = time.perf_counter(), []
        for s in range(0, len(batch), 64):  # Engine.logprobs' batches
            part = slice(s, s + 64)
            out += hf.sequence_logprobs(model, batch[part], completions[part], tokenizer.pad_token_id, shared)
        return time.perf_counter() - t, out

    _, plain = score(False)
    _, shared = score(True)
    same = sum(a["completion_ids"] == b["completion_ids"] for a, b in zip(want, got))
    gap = max(abs(x - y) for a, b in zip(plain, shared) for x, y in zip(a, b))
    tokens = sum(len(c) for c in completions)
    prompt_len = statistics.mean(len(p) for p in prompts)
    print(f"{args.prompts} prompts × n={args.n}, prompt ≈ {prompt_len:.0f} tokens, {tokens} sampled tokens")
    print(f"identical samples: {same}/{len(want)}; scoring log-probs agree to {gap:.1e}")
    for name, run in (("sampling", sample), ("scoring", score)):
        ratios, seconds = [], {True: [], False: []}
        for i in range(args.repeats):
            order = (True, False) if i % 2 else (False, True)
            timed = {shared: run(shared)[0] for shared in order}
            for shared, s in timed.items():
                seconds[shared].append(s)
            ratios.append(timed[False] / timed[True])
        for shared in (False, True):
            s = statistics.median(seconds[shared])
            label = "prefill shared" if shared else "prefill per sample"
            print(f"{name:>8} {label:>18}: {s:6.2f} s  {tokens / s:7.1f} completion tokens/s")
        print(
            f"{name:>8} speed-up (per-sample / shared), median of {args.repeats}: {statistics.median(ratios):.2f}×"
        )


if __name__ == "__main__":
    main()
