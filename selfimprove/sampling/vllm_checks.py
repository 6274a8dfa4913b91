"""Config-time reading of sampler.backend=vllm, apart from the sampler (which builds vLLM's engine):
what vLLM 0.33.0 accepts, read from its `vllm/sampling_params.py`, what it needs installed, and the
longest sequence the run will ask of it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from selfimprove.errors import ConfigError

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 2.0  # what vLLM samples at as asked
PROBE_SHAPE = (4, 24)  # the weight-push probe: sequences × tokens


def sampling_nodes(cfg) -> Iterator[tuple[str, Any]]:
    """(path, config node) of every part that asks for generations: sampler, eval, the verifiers (an
    EMA teacher samples too), and the verifiers of each schedule entry."""
    yield "sampler", cfg.sampler
    yield "eval", cfg.eval
    for name, node in (cfg.get("verifiers") or {}).items():
        yield f"verifiers.{name}", node
    for i, entry in enumerate(cfg.get("schedule") or []):
        for name, node in (entry.get("verifiers") or {}).items():
            yield f"schedule[{i}].verifiers.{name}", node


def check_sampling_values(cfg) -> None:
    """sampler.backend=vllm, at config time: vLLM raises 0 < T < 0.01 to 0.01 and refuses T > 2 or a
    top_p outside (0, 1], while this backend undoes the temperature it asked for (topk_token_stats):
    a temperature or top-p vLLM would not sample at exactly is refused here, naming the key."""
    for path, node in sampling_nodes(cfg):
        if not hasattr(node, "get"):
            continue
        t, top_p = node.get("temperature"), node.get("top_p")
        if t is not None and not MIN_TEMPERATURE <= float(t) <= MAX_TEMPERATURE:
            raise ConfigError(
                f"{path}.temperature={t}: sampler.backend=vllm samples at temperatures in "
                f"[{MIN_TEMPERATURE}, {MAX_TEMPERATURE}] only (vLLM raises smaller ones to 0.01 and "
                "refuses larger ones); use sampler=hf for this temperature"
            )
        if top_p is not None and not 0.0 < float(top_p) <= 1.0:
            raise ConfigError(f"{path}.top_p={top_p}: sampler.backend=vllm needs 0 < top_p <= 1")
        if path == "sampler" and top_p is not None and float(top_p) < 1.0:
            # the rows' logprobs are π_old: vLLM gives the nucleus's, not the tempered policy's
            raise ConfigError(
                f"sampler.top_p={top_p}: sampler.backend=vllm records the truncated distribution's log-probs "
                "(no tempered-but-untruncated mode), so an update's importance ratio would start at the kept "
                "mass, not 1: use sampler.top_p=1 or sampler=hf"
            )


def check_backend(backend: str) -> None:
    """sampler.backend: hf always; vllm only where vllm imports and a CUDA GPU is visible."""
    if backend == "hf":
        return
    if backend != "vllm":
        raise ConfigError(f"sampler.backend: {backend!r} is not hf|vllm")
    import torch

    from selfimprove.extras import require

    require("vllm", "vllm", "sampler.backend=vllm")
    if not torch.cuda.is_available():
        raise ConfigError("sampler.backend=vllm needs a CUDA GPU")


def max_model_len(cfg) -> int:
    """The longest sequence the run asks vLLM for: the longest prompt (sampler.max_prompt_tokens; the
    sampler refuses longer ones) plus the most new tokens any part asks for. Passed as vLLM's
    max_model_len, which otherwise sizes for the model's whole context and refuses to start when
    the KV cache at gpu_memory_utilization cannot hold one such sequence."""
    new = [node.get("max_new_tokens") for _, node in sampling_nodes(cfg) if hasattr(node, "get")]
    longest = int(cfg.sampler.max_prompt_tokens) + max(int(n) for n in new if n is not None)
    return max(longest, PROBE_SHAPE[1] + 1)  # the probe: its tokens, then one generated
