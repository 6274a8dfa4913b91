"""Long completions on the CPU (issue 23): RandomCalculation with a chain of thought and a \\boxed{}
answer, the embedded SmolLM2-135M-Instruct (`--tiny`: the random test model, to check the script).

Three measurements, each a `selfimprove` command run as a subprocess (printed, so each can be rerun
alone), then one table and one JSON file:
- start: the model's greedy accuracy at the lowest levels (`selfimprove eval`, a bare model),
  with the fraction of completions cut at max_new_tokens and their mean length.
- round: one training round of `math_grpo` with long completions; its time per phase
  (`phase_seconds` of the run's metrics.jsonl), compute seconds, tokens and peak memory.
- seeds: `math_grpo` (ground truth) and `math_label_free` over seeds on the lowest level, a few
  prompts per round; held-out greedy accuracy at the last round against the start (the same eval
  settings, measured once by `selfimprove eval`: greedy decoding does not depend on the run's seed),
  as median / worst / best. The label-free recipe's model selection (64 unlabelled prompts) is off
  here for cost: its final round is reported.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench/long_completions.py [--parts start,round,seeds]
      [--out runs/bench_long] [--tiny]
Timings are wall-clock on whatever machine runs it: a shared machine's are not comparable.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RECIPES = ("math_grpo", "math_label_free")


def selfimprove(args: list[str], log: Path) -> tuple[str, float]:
    """Runs `python -m selfimprove ARGS`; stdout, and the wall seconds it took. Fails loudly."""
    print("$ selfimprove " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "selfimprove", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}), see {log}:\n{proc.stderr[-2000:]}")
    return proc.stdout, seconds


def fresh(run_dir: Path) -> Path:
    """The bench's own run folder, emptied: a rerun measures anew instead of refusing to overwrite."""
    shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


def eval_json(stdout: str) -> dict:
    """The JSON object `selfimprove eval` prints last (after any progress lines)."""
    start = stdout.rindex("\n{\n") + 1 if "\n{\n" in stdout else stdout.index("{")
    return json.JSONDecoder().raw_decode(stdout[start:])[0]


def round_records(run_dir: Path) -> list[dict]:
    """The per-round records of a run's metrics.jsonl (the lines with a round's phase_seconds)."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "phase_seconds" in x]


def start(a, model: list[str], out: Path) -> list[dict]:
    rows = []
    for level in a.levels:
        args = ["eval", *model, "task=random_calculation", f"task.level={level}"]
        args += [f"eval.n_problems={a.start_problems}", "eval.k=0", f"eval.max_new_tokens={a.start_tokens}"]
        args += [f"eval.batch_size={a.start_problems}"]
        stdout, seconds = selfimprove(args, out / f"start-level{level}.log")
        m = eval_json(stdout)
        rows.append(
            {
                "level": level,
                "problems": a.start_problems,
                "max_new_tokens": a.start_tokens,
                "accuracy": m["eval/accuracy"],
                "truncated": m.get("eval/truncated"),
                "completion_tokens_mean": m.get("eval/completion_tokens_mean"),
                "seconds": seconds,
                "command": "selfimprove " + " ".join(args),
            }
        )
    return rows


def train_args(a, model: list[str], recipe: str, rounds: int) -> list[str]:
    """A small run of `recipe` on the lowest level with long completions."""
    args = [*model, f"recipe={recipe}", "task=random_calculation", f"task.level={min(a.levels)}"]
    args += [f"loop.rounds={rounds}", f"loop.prompts_per_round={a.prompts}", f"sampler.n={a.n}"]
    args += [f"sampler.max_new_tokens={a.tokens}", f"sampler.batch_size={a.prompts * a.n}"]
    args += [f"trainer.micro_batch_size={a.micro}", f"trainer.grad_accum={-(-a.prompts * a.n // a.micro)}"]
    args += ["eval.before=false", f"eval.every={rounds}", f"eval.n_problems={a.eval_problems}"]
    args += [f"eval.batch_size={a.eval_problems}", "eval.unlabelled_problems=0", "eval.select_by=null"]
    return args


def one_round(a, model: list[str], out: Path) -> dict:
    run_dir = fresh(out / "round")
    args = ["train", *train_args(a, model, "math_grpo", 1), f"run.dir={run_dir}"]
    _, seconds = selfimprove(args, out / "round.log")
    (record,) = round_records(run_dir)
    keys = ("sample/truncated", "sample/completion_tokens_mean", "sample/completion_tokens_max")
    return {
        "phase_seconds": record["phase_seconds"],
        "compute_seconds": record["compute_seconds"],
        "tokens_per_second": record["tokens_per_second"],
        "sample_tokens": record["sample/tokens"],
        "max_rss_gb": record["max_rss_gb"],
        "update_skipped": record.get("update/skipped", False),
        **{k: record.get(k) for k in keys},
        "seconds": seconds,
        "command": "selfimprove " + " ".join(args),
    }


def seeds(a, model: list[str], out: Path) -> dict:
    # the start under the runs' own eval settings: greedy, so the same for every seed and recipe
    args = ["eval", *model, "task=random_calculation", f"task.level={min(a.levels)}"]
    args += [f"eval.n_problems={a.eval_problems}", "eval.k=0", f"eval.max_new_tokens={a.tokens}"]
    args += [f"eval.batch_size={a.eval_problems}"]
    stdout, seconds = selfimprove(args, out / "seeds-start.log")
    m = eval_json(stdout)
    first = m["eval/accuracy"]
    result: dict = {"level": min(a.levels), "start": first, "start_reward": m.get("eval/reward")}
    result.update(start_seconds=seconds, recipes={})
    for recipe in RECIPES:
        sweep = fresh(out / f"seeds-{recipe}")
        seed_list = ",".join(map(str, a.seeds))
        args = [
            "train",
            "-m",
            f"seed={seed_list}",
            *train_args(a, model, recipe, a.rounds),
            f"run.dir={sweep}",
        ]
        _, seconds = selfimprove(args, out / f"seeds-{recipe}.log")
        records = {s: round_records(sweep / f"seed={s}") for s in a.seeds}
        final = {s: r[-1] for s, r in records.items()}
        acc = {s: r["eval/accuracy"] for s, r in final.items()}
        gains = [v - first for v in acc.values()]
        result["recipes"][recipe] = {
            "accuracy": acc,
            "gain_median": statistics.median(gains),
            "gain_worst": min(gains),
            "gain_best": max(gains),
            # the task's reward with the paper's partial credit: it moves where accuracy cannot
            "reward": {s: r.get("eval/reward") for s, r in final.items()},
            "sample_reward": {s: [x.get("sample/reward") for x in r] for s, r in records.items()},
            "updates": {s: sum(not x.get("update/skipped", False) for x in r) for s, r in records.items()},
            "sample_truncated": {s: r.get("sample/truncated") for s, r in final.items()},
            "seconds": seconds,
            "command": "selfimprove " + " ".join(args),
        }
    return result


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(report: dict) -> str:
    lines = []
    if "start" in report:
        lines += ["| level | problems | max_new_tokens | greedy accuracy | truncated | mean tokens | s |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for r in report["start"]:
            lines.append(
                f"| {r['level']} | {r['problems']} | {r['max_new_tokens']} | {100 * r['accuracy']:.1f}% | "
                f"{100 * (r['truncated'] or 0):.0f}% | {r['completion_tokens_mean']:.0f} | {r['seconds']:.0f} |"
            )
    if "round" in report:
        r = report["round"]
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r["phase_seconds"].items())
        lines += [
            "",
            f"one round, seconds per phase: {phases}; {r['sample_tokens']} sampled tokens at "
            f"{r['tokens_per_second']:.1f} tok/s; truncated {100 * (r['sample/truncated'] or 0):.0f}%, "
            f"mean {r['sample/completion_tokens_mean']:.0f} / max {r['sample/completion_tokens_max']} "
            f"tokens; peak RSS {r['max_rss_gb']:.2f} GB"
            + ("; update skipped" if r.get("update_skipped") else ""),
        ]
    if "seeds" in report:
        s = report["seeds"]
        start_reward = s.get("start_reward")
        lines += [
            "",
            f"start (greedy, level {s['level']}): {100 * s['start']:.1f}%, mean reward {_num(start_reward)}",
            "",
        ]
        lines += [
            "| recipe | seeds | final accuracy per seed | gain median / worst / best (points) |"
            " final mean reward per seed | sample reward per round | updates |"
        ]
        lines += ["|---|---|---|---|---|---|---|"]
        for name, r in s["recipes"].items():
            per_seed = ", ".join(f"{100 * v:.1f}%" for v in r["accuracy"].values())
            rewards = ", ".join(_num(v) for v in r.get("reward", {}).values())
            curves = "; ".join(" → ".join(map(_num, c)) for c in r.get("sample_reward", {}).values())
            lines.append(
                f"| {name} | {len(r['accuracy'])} | {per_seed} | {100 * r['gain_median']:+.1f} / "
                f"{100 * r['gain_worst']:+.1f} / {100 * r['gain_best']:+.1f} | {rewards} | {curves} | "
                f"{', '.join(map(str, r.get('updates', {}).values()))} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="start,round,seeds")
    p.add_argument("--out", type=Path, default=Path("runs/bench_long"))
    p.add_argument("--tiny", action="store_true", help="the random test model: checks the script, fast")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 2])
    p.add_argument("--start-problems", type=int, default=32)
    p.add_argument("--start-tokens", type=int, default=512)
    p.add_argument("--tokens", type=int, default=256, help="max_new_tokens of the training runs")
    p.add_argument("--prompts", type=int, default=4, help="prompts per round")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--micro", type=int, default=8, help="trainer.micro_batch_size")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--eval-problems", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args()
    model = ["model=tiny"] if a.tiny else []
    parts = a.parts.split(",")
    t0 = time.perf_counter()
    found = a.out / "long_completions.json"  # parts run separately add up in one report
    report: dict = json.loads(found.read_text()) if found.exists() else {}
    report["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
    if "start" in parts:
        report["start"] = start(a, model, a.out)
    if "round" in parts:
        report["round"] = one_round(a, model, a.out)
    if "seeds" in parts:
        report["seeds"] = seeds(a, model, a.out)
    report["seconds_of_last_call"] = time.perf_counter() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    found.write_text(json.dumps(report, indent=1))
    print(table(report))
    print(f"\n{report['seconds_of_last_call']:.0f} s for --parts {a.parts}; wrote {found}")


if __name__ == "__main__":
    main()
