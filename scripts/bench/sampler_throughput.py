"""Sampler throughput: HFSampler.generate(record=True) vs bare model.generate, as a ratio.

Measures what recording the statistics (per-token log-prob, self-certainty and entropy, i.e. one
log_softmax + exp/entr + mean over the full vocabulary per step) and HFSampler's own
padding/stacking/decoding cost on top of plain sampling. HFSampler (sampler.compile=auto) runs its own
decode loop (`sampling/decode.py`) on a CPU, and on a GPU too below 64 new tokens — so at this script's
defaults (32 and 6) on either — with prefill sharing turned off here so both variants prefill every
row's whole prompt; only on a GPU at >= 64 new tokens (e.g. --max-new-tokens 128) does it run generate
on a compiled static cache with the StatsRecorder logits processor. Both variants get the same left-padded
batch (default task prompts, `ArithmeticTask().train_problem(i)`, encoded with HFSampler.encode),
the same GenerationConfig (do_sample, top_k=0, temperature 1, top_p 1) and the same seed.

Equal lengths: HFSampler.generate builds its GenerationConfig itself, so min_new_tokens cannot be
passed (and an EOS-masking processor would put -inf into the logits the recorder sees). Instead both
variants use eos_token_id = vocab_size, an id the model can never sample (the sampler's tokenizer is
wrapped so only that attribute changes). Every sequence therefore runs exactly max_new_tokens steps;
the script checks that both variants produced the same number of tokens and the same token ids.

Timing: (a) is the whole HFSampler.generate call; (b) is only the model.generate call on prebuilt
tensors. The machine is shared, so the two are interleaved (order alternating) over --repeats
after one warm-up each, and the median of the per-repeat ratios (a)/(b) is reported (goal >= 0.95).
Each repeat also times the StatsRecorder alone on stand-in logits (batch x vocab, max_new_tokens
calls): a low-noise estimate of the ratio, (b) / ((b) + recorder), when the (a)/(b) spread is wide.

Device: the model runs on --device (default: cuda when available, else cpu); on a GPU every timer is
read after torch.cuda.synchronize(), so a reading covers the kernels it launched.

Run:  . .venv/bin/activate; HF_HUB_OFFLINE=1 python scripts/bench/sampler_throughput.py [--tiny]
      [--batch 64] [--max-new-tokens 32 6] [--repeats 5] [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf
from transformers import GenerationConfig

import selfimprove.config
from selfimprove import models
from selfimprove.sampling.hf import HFSampler, StatsRecorder, left_pad, neutral_generation_defaults
from selfimprove.tasks import ArithmeticTask


class NoEosTokenizer:
    """The tokenizer with only eos_token_id replaced (by an id outside the vocabulary)."""

    def __init__(self, tokenizer, eos: int) -> None:
        self._tok = tokenizer
        self.eos_token_id = eos

    def __getattr__(self, name):
        return getattr(self._tok, name)


def clock(device: torch.device) -> float:
    """perf_counter once the device has finished what was queued on it (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def bench(model, tokenizer, prompts, max_new: int, repeats: int, seed: int) -> None:
    eos = model.config.vocab_size  # never sampled: logits have exactly vocab_size entries
    sampler = HFSampler(NoEosTokenizer(tokenizer, eos))
    sampler.share_prompts = False  # every row's whole prompt, as (b): the recording is what is measured
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)  # what HFSampler.generate builds
    ids, mask = ids.to(device), mask.to(device)  # (a) copies its batch inside the timed call
    gen_cfg = GenerationConfig(  # what HFSampler.generate builds for greedy=False
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=max_new,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
    )

    def run_a() -> tuple[float, list[list[int]]]:
        t = clock(device)
        rows = sampler.generate(model, prompts, max_new_tokens=max_new, seed=seed, record=True)
        dt = clock(device) - t
        assert all(len(r["logprobs"]) == len(r["completion_ids"]) for r in rows)
        return dt, [r["completion_ids"] for r in rows]

    def run_b() -> tuple[float, list[list[int]]]:
        torch.manual_seed(seed)
        t = clock(device)
        with torch.no_grad(), neutral_generation_defaults(model):  # as (a): only gen_cfg decides
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
        dt = clock(device) - t
        return dt, out[:, ids.shape[1] :].tolist()

    def run_rec() -> float:  # the recorder alone on stand-in logits: its cost without the noise of (a)-(b)
        rec, scores = StatsRecorder(), torch.randn(len(prompts), eos, device=device)
        last = torch.zeros(len(prompts), 1, dtype=torch.long, device=device)
        t = clock(device)
        for _ in range(max_new):
            rec(last, scores)
        rec.finish(last)
        rec.stacked()  # what HFSampler.generate does with them, copy to the CPU included
        return clock(device) - t

    run_a(), run_b(), run_rec()  # warm-up
    ta, tb, tr, ratios = [], [], [], []
    for r in range(repeats):
        order = (run_a, run_b) if r % 2 == 0 else (run_b, run_a)
        res = {f: f() for f in order}
        tr.append(run_rec())
        (da, toks_a), (db, toks_b) = res[run_a], res[run_b]
        n_a, n_b = sum(map(len, toks_a)), sum(map(len, toks_b))
        if n_a != n_b or n_a != len(prompts) * max_new:
            raise SystemExit(f"unequal token counts: (a) {n_a}, (b) {n_b}, expected {len(prompts) * max_new}")
        same = toks_a == toks_b
        ta.append(da)
        tb.append(db)
        ratios.append((n_a / da) / (n_b / db))
        print(
            f"  repeat {r + 1}: (a) {n_a / da:8.1f} tok/s  (b) {n_b / db:8.1f} tok/s  "
            f"ratio {ratios[-1]:.3f}  [{n_a} tokens each, identical ids: {same}]"
        )
    n = len(prompts) * max_new
    print(
        f"max_new_tokens={max_new}: {len(prompts)} seqs x {max_new} = {n} tokens per call; "
        f"median (a) {n / statistics.median(ta):.1f} tok/s, (b) {n / statistics.median(tb):.1f} tok/s\n"
        f"  ratio (a)/(b): median {statistics.median(ratios):.3f} (goal >= 0.95); "
        f"per repeat {' '.join(f'{x:.3f}' for x in ratios)}\n"
        f"  StatsRecorder alone: median {1e3 * statistics.median(tr):.0f} ms per call -> ratio if it were the "
        f"only extra cost: {statistics.median([b / (b + c) for b, c in zip(tb, tr)]):.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="model.kind=tiny instead of the embedded model")
    ap.add_argument("--batch", type=int, default=64, help="sequences per generate call")
    ap.add_argument("--max-new-tokens", type=int, nargs="+", default=[32, 6])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = OmegaConf.structured(selfimprove.config.ModelConfig())
    if args.tiny:
        cfg.kind = "tiny"
    tokenizer = models.load_tokenizer(cfg)
    model = models.load_model(cfg).to(device)
    task = ArithmeticTask()
    encoder = HFSampler(tokenizer)
    prompts = [encoder.encode(task.train_problem(i)) for i in range(args.batch)]
    print(
        f"model kind={cfg.kind} dtype={cfg.dtype} params={sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"vocab={model.config.vocab_size}; batch={args.batch}, prompt lengths "
        f"{min(map(len, prompts))}-{max(map(len, prompts))}; torch threads={torch.get_num_threads()}\n"
        f"device={device} ({device_name(device)})"
    )
    print("(a) HFSampler.generate(record=True)   (b) bare model.generate, same batch/config/seed")
    for max_new in args.max_new_tokens:
        bench(model, tokenizer, prompts, max_new, args.repeats, args.seed)


if __name__ == "__main__":
    main()
