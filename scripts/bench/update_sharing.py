"""The update on a shared prefix tree against every row run whole, on one round's real rows.

A recipe's round 1 is sampled, verified and selected as the loop does (the embedded model unless
--tiny); then one optimizer step's forward and backward over its batch (every micro-batch, as
`train.steps` runs them, the optimizer step left out so both paths see the same weights) is timed
per path: `trainer.share_prefix=false` (per row) and `true` (the prefix tree), interleaved, the
order alternating, median of --repeats after one warm-up each. Printed per path: seconds per step,
the peak RSS the step adds (each path measured in a fresh child process on the saved rows, since a
process's peak only grows), and the largest gradient difference relative to the largest gradient.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench/update_sharing.py [--recipe label_free|score]
      [--repeats 3] [--tiny] [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from selfimprove import train
from selfimprove.compose import load_config
from selfimprove.loop import Loop

PATHS = ("false", "true")  # trainer.share_prefix: per row, prefix tree


def round_rows(args, run_dir: Path) -> tuple[Loop, list[dict]]:
    overrides = [
        f"recipe={args.recipe}",
        f"run.dir={run_dir}",
        "eval.before=false",
        f"model.dtype={args.dtype}",
    ]
    if args.tiny:
        overrides += ["model=tiny"]
    loop = Loop(load_config(None, overrides))
    r = loop.round(1)
    loop.sample(r)
    rows = loop.verify(r)
    return loop, loop.select(r, rows)


def forward_backward(engine, objective, rows: list[dict], micro_batch_size: int, share: str) -> float:
    """One step's forward and backward over every micro-batch; its seconds (gradients left in place)."""
    model = engine.model
    model.train()
    model.zero_grad(set_to_none=True)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with engine.accelerator.autocast():
        for micro in train.micro_batches(rows, micro_batch_size):
            loss, _ = train.micro_batch_loss(
                model,
                micro,
                objective,
                objective.normalizer(rows),
                pad=engine.pad,
                share=share,
            )
            loss.backward()
    sync()
    return time.perf_counter() - t0


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def measure_memory(args) -> None:
    """Child process: the saved rows, one step on one path; prints the peak RSS it added (GB)."""
    with open(args.rows, "rb") as f:
        saved = pickle.load(f)
    loop = Loop(load_config(None, [*saved["overrides"], f"run.dir={Path(args.rows).parent}/{args.child}"]))
    objective = loop.round(1).parts.objective
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    forward_backward(loop.engine, objective, saved["rows"], loop.cfg.trainer.micro_batch_size, args.child)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = torch.cuda.max_memory_allocated() / 2**30 if loop.engine.device.type == "cuda" else None
    print(json.dumps({"added_gb": (after - before) / 2**20, "peak_gb": after / 2**20, "cuda_peak_gb": peak}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="label_free")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return measure_memory(args)

    with tempfile.TemporaryDirectory() as tmp:
        loop, examples = round_rows(args, Path(tmp) / "run")
        engine, objective = loop.engine, loop.round(1).parts.objective
        cfg = loop.cfg.trainer
        pool = objective.step_examples(examples, 0)
        rows = [pool[i] for i in train.step_batch(len(pool), cfg.micro_batch_size * cfg.grad_accum, 0)]
        prompt = sum(len(r["prompt_ids"]) for r in rows)
        completion = sum(len(r["completion_ids"]) for r in rows)
        print(
            f"{args.recipe}: {len(rows)} rows in the step, {prompt} prompt + {completion} completion tokens "
            f"({completion / (prompt + completion):.0%} completion), micro-batches of {cfg.micro_batch_size}, "
            f"device {engine.device}, {args.dtype}"
        )
        seconds: dict[str, list[float]] = {p: [] for p in PATHS}
        got = {}
        for p in PATHS:  # warm-up, and the gradients compared
            forward_backward(engine, objective, rows, cfg.micro_batch_size, p)
            got[p] = grads(engine.model)
        for k in range(args.repeats):
            for p in PATHS if k % 2 == 0 else PATHS[::-1]:
                seconds[p].append(forward_backward(engine, objective, rows, cfg.micro_batch_size, p))
        scale = max(g.abs().max().item() for g in got["false"].values())
        diff = max((got["true"][n] - got["false"][n]).abs().max().item() for n in got["false"])

        saved = Path(tmp) / "rows.pkl"
        overrides = [
            f"recipe={args.recipe}",
            f"run.dir={tmp}/child",
            "eval.before=false",
            f"model.dtype={args.dtype}",
        ]
        overrides += ["model=tiny"] if args.tiny else []
        with open(saved, "wb") as f:
            pickle.dump({"rows": rows, "overrides": overrides}, f)
        memory = {}
        for p in PATHS:
            out = subprocess.run(
                [sys.executable, __file__, "--child", p, "--rows", str(saved)], capture_output=True, text=True
            )
            lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
            if not lines:
                print(f"memory of share_prefix={p} not measured:\n{out.stderr[-2000:]}", file=sys.stderr)
            memory[p] = (
                json.loads(lines[-1]) if lines else {"added_gb": float("nan"), "peak_gb": float("nan")}
            )

    median = {p: statistics.median(seconds[p]) for p in PATHS}
    for p, name in zip(PATHS, ("per row", "prefix tree")):
        m = memory[p]
        cuda = f", CUDA peak {m['cuda_peak_gb']:.2f} GB" if m.get("cuda_peak_gb") else ""
        print(
            f"  {name:12s} {median[p]:7.3f} s/step  (runs {', '.join(f'{s:.3f}' for s in seconds[p])}); "
            f"step adds {m['added_gb']:.2f} GB RSS, process peak {m['peak_gb']:.2f} GB{cuda}"
        )
    print(
        f"  speedup {median['false'] / median['true']:.2f}x; max |grad diff| / max |grad| = {diff / scale:.2e}"
    )


if __name__ == "__main__":
    main()
