"""Fast sampling on a GPU: eager transformers `generate` against the sampler's compiled path (static KV
cache + torch.compile, bucketed shapes), side by side on the same prompts, with the recorder on.

Prints, for each: decode tokens/s, decode steps/s, their ratio, and the fraction of the memory-bandwidth
roofline reached (bytes one decode step must read — the parameters plus the KV cache at the mean
context — times steps/s, over the GPU's peak bandwidth). The compiled path's first call pays the
compilation; it is timed and printed apart. On a CPU it runs too (a smoke test: `--compile` forces
compiling there; the roofline is then n/a).

Run:  HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench/gpu_sampling.py [--batch 64] [--max-new-tokens 128]
      [--repeats 3] [--dtype bfloat16] [--tiny] [--bandwidth-gbs 3350]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf

from selfimprove import models
from selfimprove.config import ModelConfig
from selfimprove.sampling import hf
from selfimprove.tasks import ArithmeticTask

PEAK_GBS = {
    "H100 80GB HBM3": 3350,
    "H100 PCIe": 2000,
    "H200": 4800,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
}


def peak_bandwidth(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((gbs for key, gbs in PEAK_GBS.items() if key in name), None)


def bytes_per_step(model, batch: int, context: float) -> float:
    """Parameters (read once per step) + the KV cache (every layer's keys and values, per row)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    c = model.config
    kv_heads = getattr(c, "num_key_value_heads", c.num_attention_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    element = next(model.parameters()).element_size()
    kv = 2 * c.num_hidden_layers * kv_heads * head_dim * element * batch * context
    return params + kv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--tiny", action="store_true", help="the random test model (a smoke test)")
    parser.add_argument("--compile", action="store_true", help="compile on a CPU too")
    parser.add_argument("--bandwidth-gbs", type=float, default=None)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = OmegaConf.structured(ModelConfig(kind="tiny" if args.tiny else "embedded", dtype=args.dtype))
    model, tokenizer = models.load_model(cfg).eval().to(device), models.load_tokenizer(cfg)
    eager = hf.HFSampler(tokenizer, compile="false", batch_size=args.batch)
    eager.share_prompts = False  # plain transformers generate: the baseline the issue measured
    fast = hf.HFSampler(
        tokenizer,
        compile="true" if args.compile or device.type == "cuda" else "static",
        batch_size=args.batch,
    )
    task = ArithmeticTask()
    prompts = [eager.encode(task.train_problem(i)) for i in range(args.batch)]

    def run(sampler) -> tuple[float, list[dict]]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            rows = sampler.generate(model, prompts, max_new_tokens=args.max_new_tokens, seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, rows

    compile_s, _ = run(fast)
    run(eager)
    timed = {"eager": [], "compiled": []}
    tokens = {}
    for i in range(args.repeats):
        for name in ("eager", "compiled") if i % 2 == 0 else ("compiled", "eager"):
            seconds, rows = run(eager if name == "eager" else fast)
            timed[name].append(seconds)
            tokens[name] = (
                sum(len(r["completion_ids"]) for r in rows),
                max(len(r["completion_ids"]) for r in rows),
            )
    peak = peak_bandwidth(args.bandwidth_gbs)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    prompt_len = statistics.mean(len(p) for p in prompts)
    print(
        f"{gpu}, {args.dtype}, batch {args.batch}, prompt ≈ {prompt_len:.0f} tokens, ≤ {args.max_new_tokens} new"
    )
    print(f"compiled path's first call (compilation included): {compile_s:.1f} s")
    rates = {}
    for name, seconds in timed.items():
        s = statistics.median(seconds)
        n_tokens, steps = tokens[name]
        rates[name] = n_tokens / s
        context = prompt_len + steps / 2
        fraction = (
            f"{bytes_per_step(model, args.batch, context) * steps / s / (peak * 1e9):.2%}" if peak else "n/a"
        )
        print(
            f"{name:>8}: {s:6.2f} s  {n_tokens / s:8.1f} tokens/s  {steps / s:6.1f} steps/s  roofline {fraction}"
        )
    print(f"compiled / eager tokens/s, medians of {args.repeats}: {rates['compiled'] / rates['eager']:.2f}×")


if __name__ == "__main__":
    main()
