"""The GPU sampling path's pieces: a static KV cache per bucketed shape, kept across calls and filled
from a prefill run outside generate (shared across a prompt's samples), so generate only decodes.

On a GPU, eager decoding is latency-bound: one step costs the same at batch 8 as at 256. A static
cache lets transformers' generate run the decoding step through torch.compile (CUDA graphs), but a
compiled step is specialised to the cache's shape (rows, max length), so shapes are bucketed: rows to
a power of two, prompt width to a multiple of `length_bucket`. One cache object per shape, reused, also
keeps its tensors at fixed addresses, which CUDA graphs need (a new cache each call re-records them).
"""

from __future__ import annotations

import torch
from transformers import CompileConfig, LogitsProcessor, StaticCache
from transformers.cache_utils import StaticLayer

from selfimprove.sampling.prefix import plain_prefill, prompt_cache

# Below this many new tokens `auto` decodes eagerly on a GPU too: measured on an H200, the default job
# (6 tokens) ran 87 s with its ≈ 45 s of compilation against 53 s eager, while at 128 tokens the compiled
# step decodes 6.7× faster after 30 s of compiling. The threshold lies between those two measurements.
COMPILE_FROM_TOKENS = 64


def compile_mode(
    setting: str | bool, device: torch.device, max_new_tokens: int | None = None
) -> tuple[bool, bool]:
    """(static KV cache, torch.compile) for `sampler.compile`: auto = both on a GPU for generations of
    at least COMPILE_FROM_TOKENS tokens (compilation does not pay back on shorter ones); true = both (on
    a CPU too); false = neither; "static" = the static cache without compiling (tests on a CPU)."""
    setting = str(setting).lower()
    if setting not in ("auto", "true", "false", "static"):
        raise ValueError(f"sampler.compile: {setting!r} is not auto|true|false|static")
    long_enough = max_new_tokens is None or max_new_tokens >= COMPILE_FROM_TOKENS
    static = setting in ("true", "static") or (setting == "auto" and device.type == "cuda" and long_enough)
    return static, static and setting != "static"


def bucket(size: int, limit: int, floor: int = 8) -> int:
    """Rows a batch of `size` is padded to: a power of two from `floor` up to `limit` (a GPU decodes 8
    rows as fast as 1, and every bucket is one more compilation), past `limit` a multiple of it."""
    if size > limit:
        return -(-size // limit) * limit
    return min(max(1 << (size - 1).bit_length(), floor), limit)


def round_up(width: int, step: int) -> int:
    return -(-width // max(step, 1)) * max(step, 1)


def plain_static_layers(config) -> bool:
    """Whether the model's static cache is plain full-attention layers (no sliding windows), which
    `StaticCaches.fill` knows how to fill; allocates nothing (layers are allocated lazily)."""
    return all(type(layer) is StaticLayer for layer in StaticCache(config=config, max_cache_len=1).layers)


class StaticCaches:
    """One StaticCache per shape, reset and refilled on each call. `shapes` is what has been allocated
    (and, compiled, what the decoding step was compiled for): its size is bounded by the buckets.
    The caches stay allocated between calls (`clear` frees them; the next call re-allocates, and
    CUDA graphs re-record)."""

    def __init__(self) -> None:
        self.caches: dict[tuple, StaticCache] = {}

    @property
    def shapes(self) -> set[tuple[int, int]]:
        return {key[:2] for key in self.caches}

    def clear(self) -> None:
        self.caches.clear()

    @torch.no_grad()
    def fill(
        self, model, rows: list[list[int]], pad: int, step: int, max_new_tokens: int, share: bool
    ) -> tuple[StaticCache, torch.Tensor, torch.Tensor] | None:
        """(cache, input_ids, attention_mask) for generate, the cache holding every row's prompt but its
        last token, the width a multiple of `step`; None where the model's cache layers are not plain
        static ones (sliding windows) or nothing is cached (the caller lets generate prefill)."""
        if not plain_static_layers(model.config) or max(map(len, rows)) < 2:
            return None
        filled = (share and prompt_cache(model, rows, pad)) or plain_prefill(model, rows, pad)
        dynamic = filled.cache.layers
        width = round_up(filled.input_ids.shape[1], step)
        extra = width - filled.input_ids.shape[1]  # masked columns on the left: the bucket's padding
        k = dynamic[0].keys
        key = (len(rows), width + max_new_tokens, len(dynamic), k.shape[1], k.shape[3], k.dtype, k.device)
        cache = self.caches.get(key)
        if cache is None:
            cache = StaticCache(config=model.config, max_cache_len=width + max_new_tokens)
            for layer, source in zip(cache.layers, dynamic, strict=True):
                layer.lazy_initialization(source.keys, source.values)  # zeros, at fixed addresses
            self.caches[key] = cache
        cache.reset()
        for layer, source in zip(cache.layers, dynamic):
            # all but the last prompt token, which generate runs (again) to start decoding
            layer.keys[:, :, extra : width - 1].copy_(source.keys[:, :, :-1])
            layer.values[:, :, extra : width - 1].copy_(source.values[:, :, :-1])
            layer.cumulative_length.fill_(width - 1)  # generate runs from the last prompt token on
        input_ids = torch.cat([torch.full((len(rows), extra), pad, dtype=torch.long), filled.input_ids], 1)
        attention = torch.cat([torch.zeros(len(rows), extra, dtype=torch.long), filled.attention_mask], 1)
        return cache, input_ids, attention


class FinishRows(LogitsProcessor):
    """Makes the bucket's padding rows (from `first` on) sample EOS at once, so a padding row never
    keeps generate stepping after the real rows have finished. Runs after the recorder."""

    def __init__(self, first: int, eos: int) -> None:
        self.first, self.eos = first, eos

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.eos >= scores.shape[-1]:  # an id the model cannot emit (a benchmark's fixed lengths)
            return scores
        scores[self.first :] = float("-inf")
        scores[self.first :, self.eos] = 0.0
        return scores


def compile_config(device: torch.device) -> CompileConfig:
    """Static graphs (one per bucketed shape) with CUDA graphs (transformers' default mode)."""
    config = CompileConfig(dynamic=False)
    if device.type != "cuda":  # transformers compiles on accelerators only, unless told (CPU tests)
        config._compile_all_devices = True
    # every bucketed shape (and a LoRA adapter on or off) is one more graph of the same forward: past
    # dynamo's default of 8 it would silently decode eagerly
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return config
