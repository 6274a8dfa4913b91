"""Adaptive sample budgets (Manvi et al. 2410.02725): best-of-N accuracy against the
average number of samples per prompt, adaptive vs fixed n, on held-out prompts of the default task
with the embedded SmolLM2-135M-Instruct (`--tiny`: the random test model).

Every held-out prompt gets `--n` samples once (T = 1); the policies below are replayed on them, so
every policy sees the same samples in the same order. Three signals:
- token: the model's one-token self-evaluation, P(" No") against P(" Yes") to "Would you do better if
  you started over?" after its answer (`rollout.RESTART_TEMPLATE` through the P(True) scorer, what
  `rollout=adaptive signal=restart` reads); best-of-N keeps the answer with the highest P(no restart).
- probe: a logistic probe on the last completion token's hidden state, fitted on `--fit` training
  prompts × n samples to predict P(a fresh sample of the prompt scores higher) — the fraction of the
  prompt's other samples that are right where this one is wrong (labels: the task's check, i.e. the
  ground-truth recipe's score); best-of-N keeps the lowest predicted P(restart).
- agreement (the loop's `signal=disagreement`): majority vote over the samples taken.
Fixed n: the first n samples. Adaptive: samples are taken one at a time until the signal says stop
(the kept answer's P(restart) < t; agreement: the first two agree) or n are taken; t is swept.
Reported: accuracy at fixed n = 1, 2, 4, 8, 16; the best adaptive accuracy at ≤ 1.2 and ≤ 2 samples
per prompt on average, and the fraction of fixed-n's gain (acc(n) − acc(1)) it reaches.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench/adaptive_budget.py [--prompts 200] [--n 16]
      [--fit 64] [--out runs/bench_inference/adaptive_budget.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

import torch

from selfimprove.compose import compose_config
from selfimprove.config import register
from selfimprove.engine import Engine
from selfimprove.rollout import RESTART_TEMPLATE, OneTurn
from selfimprove.sampling.backtrack import fit_probe, prefix_hidden_states
from selfimprove.stages import Context
from selfimprove.tasks import ArithmeticTask
from selfimprove.verify.ptrue import PTrue

GEN = {"max_new_tokens": 6, "temperature": 1.0, "weights": "policy"}


def draw(engine, task, problems, n: int, seed: int) -> list[list[dict]]:
    """n samples per problem, each with its token self-evaluation (score/no_restart)."""
    groups = []
    judge = PTrue(name="no_restart", template=RESTART_TEMPLATE, prefill="", options=(" No", " Yes"))
    for s in range(0, len(problems), 8):
        ctx = Context(engine, task, seed=seed + s)
        rows = judge(OneTurn()(ctx, problems[s : s + 8], n, GEN), ctx)
        groups += [rows[i * n : (i + 1) * n] for i in range(len(rows) // n)]
    return groups


def restart_labels(group: list[dict]) -> list[float]:
    """Per sample: the fraction of the prompt's other samples that score higher (a restart wins)."""
    score = [float(r["correct"]) for r in group]
    return [
        statistics.fmean(float(o > s) for j, o in enumerate(score) if j != i) for i, s in enumerate(score)
    ]


def last_states(engine, groups, layer: int) -> list[list[torch.Tensor]]:
    rows = [r for g in groups for r in g]
    with engine.model_with("policy") as model:
        states = prefix_hidden_states(
            model,
            [list(r["prompt_ids"]) for r in rows],
            [list(r["completion_ids"]) or [engine.tokenizer.eos_token_id] for r in rows],
            engine.pad,
            layer,
        )
    flat = [s[-1] for s in states]
    n = len(groups[0])
    return [flat[i * n : (i + 1) * n] for i in range(len(groups))]


def best_of(group: list[dict], restart: list[float], k: int) -> bool:
    i = min(range(k), key=lambda j: restart[j])
    return bool(group[i]["correct"])


def majority_of(group: list[dict], k: int) -> bool:
    answers = [r["answer"] for r in group[:k] if r["answer"] is not None]
    if not answers:
        return False
    top = Counter(answers).most_common(1)[0][0]
    return top == group[0]["target"]


def adaptive(groups, restarts, t: float, n: int) -> tuple[float, float]:
    """(mean samples, accuracy): take samples until the best so far has P(restart) < t."""
    used, right = [], []
    for g, r in zip(groups, restarts):
        k = 1
        while k < n and min(r[:k]) >= t:
            k += 1
        used.append(k)
        right.append(best_of(g, r, k))
    return statistics.fmean(used), statistics.fmean(right)


def adaptive_agreement(groups, n: int) -> tuple[float, float]:
    used, right = [], []
    for g in groups:
        k = 2 if g[0]["answer"] == g[1]["answer"] else n
        used.append(k)
        right.append(majority_of(g, k))
    return statistics.fmean(used), statistics.fmean(right)


def report(name, fixed: dict[int, float], points: list[tuple[float, float]]) -> dict:
    gain = fixed[max(fixed)] - fixed[1]
    out = {"fixed": fixed, "curve": points}
    for cap in (1.2, 2.0):
        ok = [acc for used, acc in points if used <= cap]
        best = max(ok) if ok else None
        out[f"adaptive_at_{cap}"] = best
        out[f"gain_fraction_at_{cap}"] = (best - fixed[1]) / gain if best is not None and gain > 0 else None
    print(
        f"{name:10s} fixed "
        + " ".join(f"n={k}:{v:.3f}" for k, v in fixed.items())
        + f" | adaptive ≤1.2: {out['adaptive_at_1.2']}, ≤2: {out['adaptive_at_2.0']}"
        + f" (gain fraction {out['gain_fraction_at_1.2']}, {out['gain_fraction_at_2.0']})"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--fit", type=int, default=64)
    parser.add_argument("--layer", type=int, default=-1)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_inference/adaptive_budget.json"))
    args = parser.parse_args()
    register()
    model = ["model=tiny"] if args.tiny else []
    engine = Engine(compose_config(["recipe=quickstart", *model]), train=False)
    task = ArithmeticTask()
    held_out = draw(engine, task, task.eval_problems(args.prompts), args.n, seed=1)
    fit = draw(engine, task, [task.train_problem(i) for i in range(args.fit)], args.n, seed=2)
    states = last_states(engine, fit, args.layer)
    labels = torch.tensor([y for g in fit for y in restart_labels(g)])
    probe = fit_probe(torch.stack([s for g in states for s in g]), labels, args.layer)
    probe_restart = [
        probe.predict(torch.stack(g)).tolist() for g in last_states(engine, held_out, args.layer)
    ]
    token_restart = [[1.0 - r["score/no_restart"] for r in g] for g in held_out]
    sizes = [k for k in (1, 2, 4, 8, 16, 32) if k <= args.n]
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "pass_at_n": {}}
    out["pass_at_n"] = {
        k: statistics.fmean(any(r["correct"] for r in g[:k]) for g in held_out) for k in sizes
    }
    print("pass@n   " + " ".join(f"n={k}:{v:.3f}" for k, v in out["pass_at_n"].items()))
    for name, restarts in (("token", token_restart), ("probe", probe_restart)):
        fixed = {k: statistics.fmean(best_of(g, r, k) for g, r in zip(held_out, restarts)) for k in sizes}
        cuts = sorted({round(x, 4) for r in restarts for x in r})
        points = [adaptive(held_out, restarts, t, args.n) for t in cuts[:: max(1, len(cuts) // 200)]]
        out[name] = report(name, fixed, points)
    fixed = {k: statistics.fmean(majority_of(g, k) for g in held_out) for k in sizes}
    out["agreement"] = report("agreement", fixed, [adaptive_agreement(held_out, args.n)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
