"""Fast sampling on a GPU: eager transformers `generate` against the sampler's static-cache path (static
KV cache + torch.compile, bucketed shapes), side by side on the same prompts, with the recorder on.

The default recipe's unit: the arithmetic task's first prompts, each repeated n = 8 times, to a batch of
64 (`--batch 256` for the larger one). Five variants:
  eager           transformers generate on a dynamic cache, every row's prompt prefilled, the recorder
                  in it (`generate_baseline.py`: the sampler before this work, the issue's baseline)
  loop            `HFSampler.generate` eager: our decode loop, every row's prompt prefilled
  loop+shared     the same with prefill sharing (each prompt's tokens once: the CPU default)
  compiled        static cache + torch.compile, the shared prefill copied into the cache (the GPU default)
  compiled-plain  the same with every row's prompt prefilled (which of the two wins where)
The last four are `HFSampler.generate`.
Every row decodes exactly --max-new-tokens (EOS is made unreachable, as in sampler_throughput.py), so
the decode rate is (call at max-new-tokens − call at 1 token) over the steps between: prefill apart.
A compiled variant's first call pays compilation; it is timed and printed apart, then the variants
are timed interleaved (order rotating) and the median of --repeats is printed: decode tokens/s, decode
steps/s, the ratio to eager, and the fraction of the memory-bandwidth roofline (bytes one decode step
must read — the parameters plus the KV cache at the mean context — times steps/s, over the GPU's peak
bandwidth from PEAK_GBS or --bandwidth-gbs). On a CPU it runs too, as a smoke test: the static path
uncompiled unless --compile, the roofline n/a; CPU timings are not results.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench/gpu_sampling.py [--batch 64|256] [--n 8]
      [--max-new-tokens 128] [--repeats 3] [--dtype bfloat16] [--tiny] [--compile] [--bandwidth-gbs 3350]
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

# Peak HBM bandwidth (GB/s), matched in order against torch.cuda.get_device_name()
PEAK_GBS = [("H100 PCIe", 2000), ("H100", 3350), ("H200", 4800), ("A100", 2000)]


class NoEosTokenizer:
    """The tokenizer with only eos_token_id replaced (by an id outside the vocabulary): fixed lengths."""

    def __init__(self, tokenizer, eos: int) -> None:
        self._tok = tokenizer
        self.eos_token_id = eos

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def peak_bandwidth(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((gbs for key, gbs in PEAK_GBS if key in name), None)


def bytes_per_step(model, batch: int, context: float) -> float:
    """Parameters (read once per step) + the KV cache (every layer's keys and values, per row)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    c = model.config
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    element = next(model.parameters()).element_size()
    return params + 2 * c.num_hidden_layers * kv_heads * head_dim * element * batch * context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="rows per call (64, or 256)")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt (the default recipe's)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--tiny", action="store_true", help="the random test model (a smoke test)")
    parser.add_argument("--compile", action="store_true", help="compile on a CPU too")
    parser.add_argument(
        "--bandwidth-gbs", type=float, default=None, help="peak bandwidth, if not in the table"
    )
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = OmegaConf.structured(ModelConfig(kind="tiny" if args.tiny else "embedded", dtype=args.dtype))
    model, tokenizer = models.load_model(cfg).eval().to(device), models.load_tokenizer(cfg)
    tokenizer = NoEosTokenizer(tokenizer, model.config.vocab_size)
    compiled = args.compile or device.type == "cuda"
    samplers = {}
    for name, setting, share in (
        ("loop", "false", False),
        ("loop+shared", "false", True),
        ("compiled" if compiled else "static", "true" if compiled else "static", True),
        ("compiled-plain" if compiled else "static-plain", "true" if compiled else "static", False),
    ):
        samplers[name] = hf.HFSampler(tokenizer, compile=setting, batch_size=args.batch)
        samplers[name].share_prompts = share
    task = ArithmeticTask()
    distinct = [samplers["loop"].encode(task.train_problem(i)) for i in range(-(-args.batch // args.n))]
    prompts = [p for p in distinct for _ in range(args.n)][: args.batch]

    def run(name: str, max_new: int) -> tuple[float, list[list[int]]]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            if name == "eager":
                completions = generate_with_recorder(model, tokenizer, prompts, max_new)
            else:
                rows = samplers[name].generate(model, prompts, max_new_tokens=max_new, seed=0)
                completions = [r["completion_ids"] for r in rows]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, completions

    names = ["eager", *samplers]
    first, tokens = {}, {}
    for name in names:  # warm-ups: a compiled variant's first call compiles its shape
        first[name], tokens[name] = run(name, args.max_new_tokens)
        run(name, 1)
        assert all(len(t) == args.max_new_tokens for t in tokens[name]), "every row decodes max_new_tokens"
    full, one = {name: [] for name in names}, {name: [] for name in names}
    for i in range(args.repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            full[name].append(run(name, args.max_new_tokens)[0])
            one[name].append(run(name, 1)[0])

    peak = peak_bandwidth(args.bandwidth_gbs)
    gpu = (
        torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke test: timings are not results)"
    )
    prompt_len = statistics.mean(len(p) for p in prompts)
    steps = args.max_new_tokens - 1  # decode steps after the prefill's first token
    print(
        f"{gpu}, {args.dtype}, batch {len(prompts)} ({len(distinct)} prompts × n={args.n}), "
        f"prompt ≈ {prompt_len:.0f} tokens, {args.max_new_tokens} new tokens per row"
    )
    for name in names:
        if name.startswith(("compiled", "static")):
            what = "compilation included" if compiled else "not compiled"
            print(f"{name}: first call ({what}) {first[name]:.1f} s; later calls below")
    decode_bytes = bytes_per_step(model, len(prompts), prompt_len + args.max_new_tokens / 2)
    rates = {}
    for name in names:
        call, prefill = statistics.median(full[name]), statistics.median(one[name])
        rates[name] = steps / max(call - prefill, 1e-9)
        roofline = f"{decode_bytes * rates[name] / (peak * 1e9):.2%}" if peak else "n/a"
        same = sum(a == b for a, b in zip(tokens[name], tokens["eager"]))
        print(
            f"{name:>15}: call {call:6.2f} s (1-token call {prefill:5.2f} s)  decode "
            f"{rates[name] * len(prompts):9.1f} tokens/s {rates[name]:7.1f} steps/s  "
            f"{rates[name] / rates['eager']:5.2f}× eager  roofline {roofline}  "
            f"[same tokens as eager: {same}/{len(prompts)}]"
        )
    print(f"medians of {args.repeats} interleaved repeats; decode = call − 1-token call, over {steps} steps")


if __name__ == "__main__":
    main()
