"""Hyperfitting against DITTO and the starting model on the same held-out passages.

Runs `recipe=hyperfit` and `recipe=ditto` (one run folder per recipe and seed, under --runs) and reads
their metrics.jsonl: the starting model is hyperfit's round 0 evaluation (eval.before), each recipe its
last round's. Both evaluate the text task's first eval.n_problems held-out passages with the same
settings (checked here): rep-4 and rep-sen of greedy continuations, distinct-n over them, and the
perplexity of the passages' true continuations. Training loss: the base row is hyperfit's first step
(a forward before any update), hyperfit's the mean of its last epoch's steps, ditto's the mean NLL of
its last round's MLE steps (its DITTO steps' loss is the repetition penalty, not a likelihood).

    python scripts/bench/hyperfitting.py --seeds 0 --runs runs/bench_hyperfit
    python scripts/bench/hyperfitting.py --seeds 0,1,2 --ditto "loop.rounds=6"   # the shipped ditto

A finished run folder is reused (resume=auto), so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

METRICS = ("rep_4", "rep_sen", "distinct_2", "distinct_4", "perplexity")
# ditto at 2 of its 6 rounds by default: the shipped 6 take ~14 CPU minutes per seed (docs/results_methods.md)
DITTO_DEFAULT = "loop.rounds=2 eval.every=2 eval.before=false"


def run_recipe(recipe: str, run_dir: Path, seed: int, overrides: list[str]) -> list[dict]:
    """Runs (or resumes: a finished run is only read) one recipe; its metrics.jsonl lines."""
    cmd = [sys.executable, "-m", "selfimprove", "train", f"recipe={recipe}", f"seed={seed}"]
    cmd += [f"run.dir={run_dir}", "resume=auto", *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def run_seconds(lines: list[dict]) -> float:
    """The run's wall time after round 0 (its rounds' training and evaluations), from its records."""
    return sum(x["round_seconds"] for x in lines if x.get("round", 0) > 0 and "round_seconds" in x)


def rounds_of(lines: list[dict]) -> dict[int, dict]:
    """Round number -> its evaluated record (the lines with eval/* fields)."""
    return {x["round"]: x for x in lines if "eval/perplexity" in x}


def steps_of(lines: list[dict]) -> list[dict]:
    return [x for x in lines if "train/loss" in x]


def saved_config(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def eval_settings(run_dir: Path) -> dict:
    """What decides the held-out passages and how they are evaluated, from the run's saved config."""
    cfg = saved_config(run_dir)
    keep = ("n_problems", "max_new_tokens", "batch_size")
    return {"task": cfg["task"], "eval": {k: cfg["eval"][k] for k in keep}}


def row(name: str, record: dict, train_loss: float | None, seconds: float | None) -> dict:
    out = {"method": name, "train_loss": train_loss, "seconds": seconds}
    out.update({k: record[f"eval/{k}"] for k in METRICS})
    return out


def bench_seed(seed: int, runs: Path, hyperfit: list[str], ditto: list[str]) -> list[dict]:
    hf_dir, dt_dir = runs / f"hyperfit-s{seed}", runs / f"ditto-s{seed}"
    hf_lines = run_recipe("hyperfit", hf_dir, seed, ["eval.before=true", *hyperfit])
    dt_lines = run_recipe("ditto", dt_dir, seed, ditto)
    if eval_settings(hf_dir) != eval_settings(dt_dir):
        raise SystemExit(f"the runs evaluate different passages or settings: {hf_dir}, {dt_dir}")
    hf_rounds, dt_rounds = rounds_of(hf_lines), rounds_of(dt_lines)
    hf_steps = steps_of(hf_lines)
    # one epoch of hyperfit's steps: its passages / its batch (each step draws a batch at random)
    saved = saved_config(hf_dir)
    batch = saved["trainer"]["micro_batch_size"] * saved["trainer"]["grad_accum"]
    epoch = max(1, round(saved["loop"]["prompts_per_round"] / batch))
    last_epoch = [x["train/loss"] for x in hf_steps[-epoch:]]
    last_round = max(x["round"] for x in steps_of(dt_lines))
    mle = [
        x["ditto/mle_nll"] for x in steps_of(dt_lines) if x["round"] == last_round and "ditto/mle_nll" in x
    ]
    rows = [
        row("base", hf_rounds[0], hf_steps[0]["train/loss"], None),
        row("ditto", dt_rounds[max(dt_rounds)], statistics.mean(mle) if mle else None, run_seconds(dt_lines)),
        row("hyperfit", hf_rounds[max(hf_rounds)], statistics.mean(last_epoch), run_seconds(hf_lines)),
    ]
    for r in rows:
        r["seed"] = seed
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per method and column: the median over seeds, and the worst and best (by the column's sense:
    low repetition, high distinct-n and low perplexity are good)."""
    out = []
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        entry: dict = {"method": name, "seeds": [r["seed"] for r in mine]}
        for key in ("train_loss", *METRICS):
            values = [r[key] for r in mine if r[key] is not None]
            if not values:
                entry[key] = None
                continue
            higher_better = key.startswith("distinct")
            entry[key] = {
                "median": statistics.median(values),
                "worst": min(values) if higher_better else max(values),
                "best": max(values) if higher_better else min(values),
            }
        out.append(entry)
    return out


def table(summary: list[dict], n_seeds: int) -> str:
    head = ["method", "train loss", "rep-4", "rep-sen", "distinct-2", "distinct-4", "perplexity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in summary:
        cells = [entry["method"]]
        for key in ("train_loss", *METRICS):
            v = entry[key]
            if v is None:
                cells.append("—")
            elif n_seeds == 1:
                cells.append(f"{v['median']:.3f}")
            else:  # median (worst, best)
                cells.append(f"{v['median']:.3f} ({v['worst']:.3f}, {v['best']:.3f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--runs", default="runs/bench_hyperfit", help="run folders go here")
    parser.add_argument("--hyperfit", default="", help="overrides for recipe=hyperfit, space-separated")
    parser.add_argument("--ditto", default=DITTO_DEFAULT, help="overrides for recipe=ditto, space-separated")
    parser.add_argument("--out", default=None, help="JSON file (default: <runs>/hyperfitting.json)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = Path(args.runs)
    rows = [r for s in seeds for r in bench_seed(s, runs, args.hyperfit.split(), args.ditto.split())]
    summary = summarise(rows)
    print(table(summary, len(seeds)))
    out = Path(args.out) if args.out else runs / "hyperfitting.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "seeds": seeds,
        "hyperfit": args.hyperfit,
        "ditto": args.ditto,
        "rows": rows,
        "summary": summary,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
