"""Inference-time methods at equal query cost: plain sampling, typical sampling, blockwise rejection
sampling and tokenwise backtracking (exact and learned verifier), on the default arithmetic task and
the Dyck task, with the embedded SmolLM2-135M-Instruct (`--tiny`: the random test model).

Per method and task: accuracy (Dyck: validity) per sample, distinct answers per prompt (of `--k`
samples), and query cost per sample (tokens generated + tokens erased; blockwise rejection: every
token of every drawn sequence). Blockwise rejection draws whole sequences until the same verifier
accepts the finished one or the row has spent its backtracking counterpart's mean query cost (equal
cost), keeping the last one. The learned verifier is a logistic probe on hidden layer `--layer`,
fitted on `--fit` training prompts × 8 plain samples labelled by the task's check
(`backtrack.fit_probe`); blockwise, it judges a finished sequence by its last hidden state.

Also Botta et al.'s check on the uniform-bracket LM (the tiny random model's logits made uniform over
the four bracket tokens and EOS: only its KV cache matters there): Q = 0 reproduces plain sampling
(the same tokens), Q = ∞ with B = 1 and no same-prefix guard gives only valid strings.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench/inference_methods.py [--prompts 64] [--k 4]
      [--quota 4] [--block 2] [--typical 0.5] [--out runs/bench_inference/inference_methods.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from selfimprove import models
from selfimprove.config import BacktrackConfig, ModelConfig
from selfimprove.sampling import HFSampler
from selfimprove.sampling.backtrack import (
    Backtracker,
    TaskVerifier,
    UniformBrackets,
    fit_probe,
    prefix_hidden_states,
)
from selfimprove.tasks import ArithmeticTask, DyckTask


def summary(task, problems, outs, k: int) -> dict:
    right = [task.is_correct(o["completion"], p) for o, p in zip(outs, problems)]
    answers = [task.extract_answer(o["completion"]) for o in outs]
    distinct = [len({a for a in answers[i : i + k] if a is not None}) for i in range(0, len(outs), k)]
    return {
        "accuracy": statistics.fmean(right),
        "distinct_per_prompt": statistics.fmean(distinct),
        "query_cost": statistics.fmean(o.get("query_cost", len(o["completion_ids"])) for o in outs),
        "backtracks": statistics.fmean(o.get("backtracks", 0) for o in outs),
    }


def blockwise(sampler, model, problems, prompts, rejects, budget: float, seed: int, **gen) -> list[dict]:
    """Whole sequences, redrawn where `rejects(outs, indices)` says the finished one is wrong, until
    each row has spent `budget` tokens (the last draw is kept)."""
    outs = sampler.generate(model, prompts, seed=seed, **gen)
    cost = [len(o["completion_ids"]) for o in outs]
    for attempt in range(1, 100):
        pending = [i for i in range(len(outs)) if cost[i] < budget]
        redo = [i for i, bad in zip(pending, rejects([outs[i] for i in pending], pending)) if bad]
        if not redo:
            break
        again = sampler.generate(model, [prompts[i] for i in redo], seed=seed + attempt, **gen)
        for i, o in zip(redo, again):
            outs[i], cost[i] = o, cost[i] + len(o["completion_ids"])
    return [{**o, "query_cost": c} for o, c in zip(outs, cost)]


def exact_rejects(task, problems):
    return lambda outs, idx: [
        task.prefix_error(problems[i], o["completion"], True, 0) for o, i in zip(outs, idx)
    ]


def probe_rejects(probe, model, prompts, pad: int, threshold: float):
    """The probe on each finished sequence's last hidden state (what it reads before EOS is kept)."""

    def rejects(outs, idx):
        if not outs:
            return []
        completions = [o["completion_ids"] or [pad] for o in outs]
        states = prefix_hidden_states(model, [prompts[i] for i in idx], completions, pad, probe.layer)
        return (probe.predict(torch.stack([s[-1] for s in states])) >= threshold).tolist()

    return rejects


def learned_probe(sampler, model, task, n_fit: int, layer: int, max_new_tokens: int):
    problems = [task.train_problem(i) for i in range(n_fit) for _ in range(8)]
    prompts = [sampler.encode(p) for p in problems]
    outs = sampler.generate(model, prompts, max_new_tokens=max_new_tokens, seed=123)
    states = prefix_hidden_states(
        model, prompts, [o["completion_ids"] for o in outs], sampler.tokenizer.pad_token_id, layer
    )
    wrong = [float(not task.is_correct(o["completion"], p)) for o, p in zip(outs, problems)]
    error = torch.cat([torch.full((len(s),), w) for s, w in zip(states, wrong)])
    keep = [i for i, s in enumerate(states) if len(s)]
    return fit_probe(torch.cat([states[i] for i in keep]), error, layer), statistics.fmean(wrong)


def bench_task(name, task, model, tok, args, max_new_tokens: int) -> dict:
    sampler = HFSampler(tok, compile="false", batch_size=256)
    problems = [p for p in task.eval_problems(args.prompts) for _ in range(args.k)]
    prompts = [sampler.encode(p) for p in problems]
    gen = dict(max_new_tokens=max_new_tokens, seed=args.seed)
    settings = BacktrackConfig(quota=args.quota, block=args.block, threshold=0.5, layer=args.layer)
    results, seconds = {}, {}

    def run(label, fn):
        t = time.perf_counter()
        outs = fn()
        seconds[label] = time.perf_counter() - t
        results[label] = summary(task, problems, outs, args.k)
        print(f"  {name:10s} {label:28s} " + "  ".join(f"{k}={v:.3f}" for k, v in results[label].items()))

    run("plain", lambda: sampler.generate(model, prompts, **gen))
    run(f"typical τ={args.typical}", lambda: sampler.generate(model, prompts, typical_p=args.typical, **gen))
    probe, fit_error = learned_probe(sampler, model, task, args.fit, args.layer, max_new_tokens)
    pad = tok.pad_token_id
    verifiers = {
        "exact": (lambda: TaskVerifier(task, problems, tok), exact_rejects(task, problems)),
        "probe": (lambda: probe, probe_rejects(probe, model, prompts, pad, settings.threshold)),
    }
    for kind, (verifier, rejects) in verifiers.items():
        label = f"backtrack {kind} Q={args.quota} B={args.block}"
        run(
            label,
            lambda: sampler.generate(model, prompts, backtrack=Backtracker(settings, verifier()), **gen),
        )
        budget = results[label]["query_cost"]
        run(
            f"blockwise {kind} (same cost)",
            lambda: blockwise(
                sampler, model, problems, prompts, rejects, budget, args.seed, max_new_tokens=max_new_tokens
            ),
        )
    return {"methods": results, "seconds": seconds, "probe_fit_error_rate": fit_error}


def uniform_bracket_check(args) -> dict:
    cfg = OmegaConf.structured(ModelConfig(kind="tiny"))
    model, tok = models.load_model(cfg).eval(), models.load_tokenizer(cfg)
    task = DyckTask(length=6)
    stub = UniformBrackets(model, tok)
    sampler = HFSampler(tok, compile="false", batch_size=256)
    problems = [p for p in task.eval_problems(32) for _ in range(8)]
    prompts = [sampler.encode(p) for p in problems]
    gen = dict(max_new_tokens=12, seed=args.seed)

    def valid(outs):
        return statistics.fmean(task.reward(o["completion"], p) for o, p in zip(outs, problems))

    plain = sampler.generate(stub, prompts, **gen)
    zero = sampler.generate(
        stub,
        prompts,
        backtrack=Backtracker(BacktrackConfig(quota=0), TaskVerifier(task, problems, tok)),
        **gen,
    )
    unlimited = BacktrackConfig(quota=10**6, block=1, same_prefix_once=False)
    full = sampler.generate(
        stub, prompts, backtrack=Backtracker(unlimited, TaskVerifier(task, problems, tok)), **gen
    )
    out = {
        "plain_validity": valid(plain),
        "q0_validity": valid(zero),
        "q0_same_tokens": [o["completion_ids"] for o in zero] == [o["completion_ids"] for o in plain],
        "unlimited_b1_validity": valid(full),
        "unlimited_b1_query_cost": statistics.fmean(o["query_cost"] for o in full),
    }
    print("  uniform-bracket LM: " + "  ".join(f"{k}={v}" for k, v in out.items()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--quota", type=int, default=4)
    parser.add_argument("--block", type=int, default=2)
    parser.add_argument("--typical", type=float, default=0.5)
    parser.add_argument("--layer", type=int, default=-1)
    parser.add_argument(
        "--fit", type=int, default=48, help="training prompts (x8 samples) the probe is fitted on"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_inference/inference_methods.json"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    cfg = OmegaConf.structured(ModelConfig(kind="tiny" if args.tiny else "embedded"))
    model, tok = models.load_model(cfg).eval(), models.load_tokenizer(cfg)
    report = {"args": {k: str(v) for k, v in vars(args).items()}}
    report["uniform_bracket_lm"] = uniform_bracket_check(args)
    report["arithmetic"] = bench_task("arithmetic", ArithmeticTask(), model, tok, args, 6)
    report["dyck"] = bench_task("dyck", DyckTask(length=8), model, tok, args, 16)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
