"""Prefill sharing: sampling a round's unit with each prompt's prefill computed once and its key/value
cache repeated over the prompt's n samples, against computing it for every sample.

The default recipes sample n = 8 completions of ≈ 6 tokens after a ≈ 46-token prompt, so without
sharing most of sampling is the prompt, eight times over. Both variants run `HFSampler.generate` on
the same unit (the default task's first prompts, each repeated n times), the same seed and settings;
the script checks they sample the same tokens, and prints sampled tokens/s of each and their ratio,
the median over interleaved repeats (order alternating) after one warm-up each.

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
    sampler = hf.HFSampler(tokenizer)
    task = ArithmeticTask()
    prompts = [sampler.encode(task.train_problem(i)) for i in range(args.prompts)]
    batch = [p for p in prompts for _ in range(args.n)]
    shared_cache = hf.shared_prompt_cache

    def run(shared: bool) -> tuple[float, list[dict]]:
        hf.shared_prompt_cache = shared_cache if shared else (lambda *a: None)
        t = time.perf_counter()
        rows = sampler.generate(model, batch, max_new_tokens=args.max_new_tokens, seed=0)
        return time.perf_counter() - t, rows

    _, want = run(False)  # warm-ups, and the check that both sample the same tokens
    _, got = run(True)
    same = sum(a["completion_ids"] == b["completion_ids"] for a, b in zip(want, got))
    tokens = sum(len(r["completion_ids"]) for r in want)
    ratios, seconds = [], {True: [], False: []}
    for i in range(args.repeats):
        order = (True, False) if i % 2 else (False, True)
        timed = {shared: run(shared)[0] for shared in order}
        for shared, s in timed.items():
            seconds[shared].append(s)
        ratios.append(timed[False] / timed[True])
    hf.shared_prompt_cache = shared_cache
    prompt_len = statistics.mean(len(p) for p in prompts)
    print(f"{args.prompts} prompts × n={args.n}, prompt ≈ {prompt_len:.0f} tokens, {tokens} sampled tokens")
    print(f"identical samples: {same}/{len(want)}")
    for shared in (False, True):
        s = statistics.median(seconds[shared])
        name = "prefill shared " if shared else "prefill per sample"
        print(f"{name:>18}: {s:6.2f} s  {tokens / s:7.1f} sampled tokens/s")
    print(f"speed-up (per-sample / shared), median of {args.repeats}: {statistics.median(ratios):.2f}×")


if __name__ == "__main__":
    main()
