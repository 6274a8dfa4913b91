"""Sampling with vLLM, colocated in each training process (sampler.backend=vllm; a GPU and the 'vllm' extra).

Each rank runs its own engine on its own GPU (`distributed_executor_backend="external_launcher"`,
tensor_parallel_size=1), samples its own prompts, sleeps while the trainer updates, and takes the
trainer's weights after each update (`push`), checked by a log-prob probe.

Written against vLLM 0.33.0 (`VLLM_VERSION`; source read from its wheel): `vllm/entrypoints/llm.py`
(LLM(...), LLM.generate, LLM.sleep/wake_up, LLM.collective_rpc, LLM.reset_prefix_cache -> bool),
`vllm/v1/worker/gpu_worker.py` (Worker.reload_weights: load_weights plus the post-load processing),
`vllm/v1/executor/uniproc_executor.py` (external_launcher: the engine runs in the calling process,
on the CUDA device set once in the thread that built it), `vllm/sampling_params.py` (SamplingParams:
0 < T < 0.01 raised to 0.01, T > 2 and top_p outside (0, 1] refused), `vllm/outputs.py`
(RequestOutput, CompletionOutput), `vllm/logprobs.py` (Logprob), `vllm/config/model.py` (dtype,
max_model_len, logprobs_mode, max_logprobs).

What differs from the hf backend (`selfimprove.sampling.hf`):
- per-token `logprobs` are vLLM's "processed_logprobs": at top_p = 1 exactly hf's, the policy at the
  sampling temperature (π_old of an importance ratio); with top_p < 1 the nucleus's, as vLLM has no
  tempered-but-untruncated mode ("raw" is untempered): refused at config time (`vllm_checks`);
- `self_certainty` and `entropy` are APPROXIMATED from the top-k log-probs vLLM returns
  (`sampler.vllm.logprobs_topk`; see `topk_token_stats`): recipes whose scorers need the full
  next-token distribution (self-certainty) get this approximation. The exact alternative is the
  trainer's own forward over prompt + completion (as `sequence_logprobs` does), at the cost of one
  forward pass over every sampled sequence, like scoring under the base model.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig

from selfimprove.sampling.hf import HFSampler, sequence_logprobs
from selfimprove.sampling.vllm_checks import PROBE_SHAPE, max_model_len

VLLM_VERSION = "0.33.0"  # the vLLM release whose source this module was written against (commit g4ba787ec9)
PROBE_SEED = 1234  # the probe's fixed token sequences come from this seed


class WeightSyncError(RuntimeError):
    """vLLM's copy of the weights does not reproduce the trainer's log-probs after a push."""


class WeightSyncTimeout(WeightSyncError):
    """A weight push took longer than sampler.vllm.sync_timeout_s."""


# ---------------------------------------------------------------- pure helpers


def collapse_repeats(prompts: list[list[int]]) -> list[tuple[list[int], int]]:
    """Runs of consecutive equal prompts as (prompt, count): one vLLM request with n=count each."""
    groups: list[tuple[list[int], int]] = []
    for p in prompts:
        if groups and groups[-1][0] == p:
            groups[-1] = (p, groups[-1][1] + 1)
        else:
            groups.append((list(p), 1))
    return groups


def expand(per_request: list[list[Any]], counts: list[int]) -> list[Any]:
    """Flattens one list of rows per request back into one row per original prompt, in order."""
    if [len(r) for r in per_request] != list(counts):
        raise ValueError(
            f"expected {list(counts)} completions per request, got {[len(r) for r in per_request]}"
        )
    return [row for rows in per_request for row in rows]


def request_seeds(seed: int, counts: list[int]) -> list[int]:
    """A seed per request such that vLLM's child k (seed + k, vllm/v1/engine/parallel_sampling.py)
    gets seed·1000003 + its row index: distinct per row, reproducible, independent of batching."""
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [(seed * 1_000_003 + s) % (2**31 - 1) for s in starts]


def topk_token_stats(topk_logprobs: list[float], vocab: int, temperature: float = 1.0) -> tuple[float, float]:
    """(self_certainty, entropy) of the model's next-token distribution from the top-k log-probs of
    the sampling distribution q (vLLM's processed_logprobs at this temperature).

    Approximation: the mass 1 - Σ_topk q is spread uniformly over the other V - k tokens; then
    the temperature is undone (p ∝ q^T) and p renormalised. Exact when k = V (nothing missing).
    Non-finite entries (tokens cut by top-p) count as unobserved. With top_p < 1 the processed
    distribution hides the model's tail (its observed mass is 1), so the missing mass is floored
    at 1e-6: self-certainty then describes the nucleus, not comparable with top_p = 1 runs.
    """
    lq = torch.tensor([x for x in topk_logprobs if math.isfinite(x)], dtype=torch.float64)
    k = int(lq.numel())
    rest = vocab - k
    if rest < 0:
        raise ValueError(f"{k} log-probs for a vocabulary of {vocab}")
    parts = [lq]
    if rest:
        missing = max(1.0 - float(lq.exp().sum()), 1e-6)
        parts.append(torch.full((rest,), math.log(missing / rest), dtype=torch.float64))
    logq = torch.cat(parts)
    logp = torch.log_softmax(logq * temperature, dim=0)
    self_certainty = float(-logp.mean() - math.log(vocab))
    entropy = float(torch.special.entr(logp.exp()).sum())
    return self_certainty, entropy


def rows_from_outputs(
    outputs,
    eos_id: int | None,
    tokenizer,
    *,
    vocab: int | None = None,
    temperature: float = 1.0,
    record: bool = True,
) -> list[list[dict]]:
    """vLLM RequestOutputs → for each request, one row per completion (hf's row format).

    A completion is cut after its first EOS (kept: it is a decision too). `logprobs` is the sampled
    token's entry of each position's {token_id: Logprob} (vLLM always includes it); self-certainty
    and entropy come from all entries of the position (`topk_token_stats`, needs `vocab`).
    """
    if record and vocab is None:
        raise ValueError("rows_from_outputs: record needs the vocabulary size")
    per_request = []
    for out in outputs:
        rows = []
        for comp in out.outputs:
            ids = list(comp.token_ids)
            n = ids.index(eos_id) + 1 if eos_id is not None and eos_id in ids else len(ids)
            row = {
                "completion_ids": ids[:n],
                "completion": tokenizer.decode(ids[:n], skip_special_tokens=True),
                "truncated": comp.finish_reason == "length",  # stopped by max_tokens, not by an EOS
            }
            if record:
                if comp.logprobs is None:
                    raise ValueError("vLLM returned no logprobs (SamplingParams.logprobs unset)")
                positions = [comp.logprobs[t] for t in range(n)]
                row["logprobs"] = [float(pos[tok].logprob) for pos, tok in zip(positions, ids[:n])]
                stats = [
                    topk_token_stats([lp.logprob for lp in pos.values()], vocab, temperature)
                    for pos in positions
                ]
                row["self_certainty"] = [s for s, _ in stats]
                row["entropy"] = [e for _, e in stats]
            rows.append(row)
        per_request.append(rows)
    return per_request


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights vLLM loads, under Hugging Face names.

    A peft LoRA model: each LoRA'd layer merged as W + scaling · B @ A (scaling = alpha / r, or
    peft's own for rslora), `base_model.model.` and `.base_layer` removed, lora_* tensors dropped,
    modules_to_save taken from the trained copy. A plain transformers model: its state dict as is.
    The model must hold whole tensors (unwrap DDP; gather under ZeRO-3/FSDP first).
    """
    state = model.state_dict()
    if not any("lora_" in k for k in state):
        return {k: v.detach() for k, v in state.items()}
    deltas: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if not (hasattr(mod, "base_layer") and hasattr(mod, "scaling")):
            continue
        for a in getattr(mod, "active_adapters", []):
            if a in getattr(mod, "lora_A", {}):
                delta = mod.lora_B[a].weight.float() @ mod.lora_A[a].weight.float()
                if getattr(mod, "fan_in_fan_out", False):
                    delta = delta.T
            elif a in getattr(mod, "lora_embedding_A", {}):
                delta = (mod.lora_embedding_B[a].float() @ mod.lora_embedding_A[a].float()).T
            else:
                continue
            key = f"{name}.base_layer.weight"
            deltas[key] = deltas.get(key, 0) + delta * mod.scaling[a]
    out = {}
    for k, v in state.items():
        if "lora_" in k or ".original_module." in k:
            continue
        v = v.detach()
        if k in deltas:
            v = (v.float() + deltas[k].to(v.device)).to(v.dtype)
        k = (
            k.removeprefix("base_model.model.")
            .replace(".base_layer", "")
            .replace(".modules_to_save.default", "")
        )
        out[k] = v
    return out


def probe_max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    """max |a - b| over the probe's token log-probs (sequences must match in shape)."""
    if [len(x) for x in a] != [len(y) for y in b]:
        raise ValueError("probe log-prob sequences differ in length")
    return max((abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys)), default=0.0)


def check_probe(diff: float, tolerance: float) -> float:
    if not diff <= tolerance:  # nan fails too
        raise WeightSyncError(
            f"after the weight push vLLM's log-probs differ from the trainer's by {diff:.4g} nats/token "
            f"> sampler.vllm.probe_tolerance={tolerance}"
        )
    return diff


def run_with_deadline(fn: Callable[[], Any], seconds: float, what: str, device: int | None = None) -> Any:
    """fn() in a worker thread; past `seconds` raises WeightSyncTimeout (the thread is abandoned).
    `device`: the CUDA device fn's kernels run on. CUDA's current device is per thread and a new
    thread starts on GPU 0, so it is set in the thread before fn runs."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            if device is not None:
                torch.cuda.set_device(device)
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    thread = threading.Thread(target=target, name=f"selfimprove-{what}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise WeightSyncTimeout(f"{what} took longer than sampler.vllm.sync_timeout_s={seconds}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def probe_sequences(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(0, vocab, PROBE_SHAPE, generator=g).tolist()


# ---------------------------------------------------------------- the sampler


class VLLMSampler:
    """HFSampler's interface on a colocated vLLM engine. The engine calls, per round:
    generate(...) → sleep() before the trainer's update → push(model) after it (wakes the engine).

    vLLM holds one copy of the weights; `holds` names it ("policy" as loaded and after each push of
    the trained weights, or what the engine pushed instead, e.g. the EMA), so the engine pushes
    again only when a request asks for other weights.
    """

    def __init__(
        self,
        tokenizer,
        model_path: str,
        cfg: DictConfig,
        *,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        from selfimprove.extras import require

        vllm = require("vllm", "vllm", "sampler.backend=vllm")
        self.cfg = cfg.sampler.vllm
        self.tokenizer = tokenizer
        self.hf = HFSampler(tokenizer, cfg.sampler.max_prompt_tokens)  # encode() only
        self.autocast = autocast  # the trainer's side of the probe runs as the trainer samples
        self._sampling_params = vllm.SamplingParams
        if "RANK" not in os.environ:  # one process: a world of one on a free port, not vLLM's 29500
            from selfimprove.backends import _single_process_group

            _single_process_group()
        topk = int(self.cfg.logprobs_topk)
        self.max_model_len = max_model_len(cfg)
        self.llm = vllm.LLM(
            model=str(model_path),
            dtype=cfg.model.dtype,  # vLLM's "auto" runs a float32 model in bf16 on CUDA
            max_model_len=self.max_model_len,
            tensor_parallel_size=1,
            distributed_executor_backend="external_launcher",
            seed=int(cfg.seed) + int(os.environ["RANK"]),
            gpu_memory_utilization=float(self.cfg.gpu_memory_utilization),
            enable_sleep_mode=bool(self.cfg.sleep),
            enforce_eager=bool(self.cfg.enforce_eager),
            logprobs_mode="processed_logprobs",
            max_logprobs=-1 if topk < 0 else max(topk, 20),
        )
        self.device = torch.cuda.current_device()  # set by vLLM in this thread; pushes run in another
        self.vocab = self.llm.model_config.get_vocab_size()
        self.asleep = False
        self.stale = False  # weights discarded by sleep(level=2) and not pushed since
        self.holds = "policy"  # loaded from the policy's own folder: its weights until the first update

    def encode(self, problem) -> list[int]:
        return self.hf.encode(problem)

    def generate(
        self,
        model,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        typical_p: float = 1.0,
        greedy: bool = False,
        seed: int = 0,
        record: bool = True,
    ) -> list[dict]:
        """As HFSampler.generate; `model` is ignored (vLLM holds its own copy, updated by push).
        vLLM has no typical sampling (refused at config time, and here)."""
        if typical_p != 1.0:
            raise ValueError(f"typical_p={typical_p}: vLLM has no typical sampling; use sampler=hf")
        longest = max((len(p) for p in prompts), default=0) + max_new_tokens
        if longest > self.max_model_len:
            raise ValueError(
                f"a {longest}-token sequence is longer than vLLM's max_model_len={self.max_model_len} "
                "(sampler.max_prompt_tokens plus the most max_new_tokens the config asks for)"
            )
        self.wake()
        groups = collapse_repeats(prompts)
        counts = [c for _, c in groups]
        params = [
            self._sampling_params(
                n=1 if greedy else c,  # vLLM refuses n > 1 when greedy: one decode, copied below
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                max_tokens=max_new_tokens,
                seed=s,
                logprobs=int(self.cfg.logprobs_topk) if record else None,
                detokenize=False,  # rows_from_outputs decodes the cut completion itself
            )
            for c, s in zip(counts, request_seeds(seed, counts))
        ]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p, _ in groups], params, use_tqdm=False)
        per_request = rows_from_outputs(
            outputs,
            self.tokenizer.eos_token_id,
            self.tokenizer,
            vocab=self.vocab,
            temperature=1.0 if greedy else temperature,  # greedy: vLLM returns the untempered log-probs
            record=record,
        )
        if greedy:
            per_request = [[copy.deepcopy(rows[0]) for _ in range(c)] for rows, c in zip(per_request, counts)]
        return expand(per_request, counts)

    def sleep(self) -> None:
        """Before the trainer's update: free weights and KV cache (level 2: a push follows)."""
        if self.cfg.sleep and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = self.stale = True

    def wake(self) -> None:
        if self.asleep:
            if self.stale:
                raise WeightSyncError("the vLLM engine slept (weights discarded) and has had no push since")
            self.llm.wake_up()
            self.asleep = False

    def push(self, model, holds: str = "policy") -> float:
        """Loads `model`'s weights into vLLM and checks them with the probe; returns the probe's
        max |log-prob difference| (logged as sampler/probe_max_abs_diff). Within sync_timeout_s, on
        this process's CUDA device. `holds` names the weights pushed (see the class)."""
        timeout = float(self.cfg.sync_timeout_s)
        diff = run_with_deadline(lambda: self._push(model), timeout, "vLLM weight push", self.device)
        self.holds = holds
        return diff

    def _push(self, model) -> float:
        self.holds = None  # half-pushed weights are nobody's
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        weights = list(merged_state_dict(model).items())
        # reload_weights is load_weights plus vLLM's post-load processing (e.g. quantised layers)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = self.stale = False
        if not self.llm.reset_prefix_cache():  # cached prefixes hold the old weights' keys and values
            raise WeightSyncError("vLLM could not reset its prefix cache after the weight push")
        probe = probe_sequences(min(self.vocab, len(self.tokenizer)))
        params = self._sampling_params(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in probe], params, use_tqdm=False)
        ours = [
            [float(pos[t].logprob) for pos, t in zip(o.prompt_logprobs[1:], p[1:])]
            for o, p in zip(outs, probe)
        ]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        was_training = model.training
        model.eval()
        try:
            with self.autocast():  # in vLLM's dtype, as the trainer's own sampling runs
                theirs = sequence_logprobs(model, [p[:1] for p in probe], [p[1:] for p in probe], pad)
        finally:
            model.train(was_training)
        return check_probe(probe_max_diff(ours, theirs), float(self.cfg.probe_tolerance))
