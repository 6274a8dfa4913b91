"""trl's GRPOTrainer vs our `grpo_oracle` recipe: held-out accuracy against training wall-clock time.

Two configurations, run in this order and reported like-for-like first (`--configs like,shipped`):
- like (like-for-like): trl gets our recipe's lr, prompts per step, samples per prompt, loss
  normalisation (normalize=sequence -> loss_type="grpo", token -> "dapo", constant -> "dr_grpo"),
  advantage scaling (estimator=grpo -> scale_rewards="group", drgrpo -> "none"), KL β, weight decay
  and gradient clipping; ours trains on every group (`selector.drop_zero=false`: trl cannot skip the
  all-equal groups, and their sequences count in its mean); both evaluate after every step; our clock
  is the wall time from round 0's evaluation on minus each evaluation, so it counts our checkpoint
  writes and everything else a round does, as trl's clock counts everything but its evaluations.
- shipped (as shipped): each side as described below, ours the recipe as it is.

Both sides train the same model (the embedded SmolLM2-135M-Instruct; `--tiny`: the random test model)
with the same LoRA (r16, alpha 32, q_proj/v_proj, our seeded init), on the default task's training
prompts in order (`ArithmeticTask(level="add_2d_1d", seed=0, prefill=True).train_problem(i)`), built
with the chat template + the task's prefill exactly as `HFSampler.encode` does (trl gets the text;
the script checks it tokenizes to the same ids), 8 completions per prompt at temperature 1, at most
6 new tokens, reward = the task's exact match (`task.is_correct`: 1.0 or 0.0, what our ground-truth
verifier scores; `--partial-reward` gives trl `task.reward`'s partial credit instead).

trl as shipped (a subprocess): GRPOTrainer, use_vllm=False, 8 prompts x 8 completions per step
(per_device_train_batch_size=64, num_generations=8), beta=0 (trl's default), its default loss
(loss_type="dapo", scale_rewards="group"), lr `--trl-lr`, constant (trl's default decays linearly to 0
over max_steps), fp32 (trl's default: bf16), no gradient checkpointing (trl's default: on; ours: off),
prompts unshuffled. trl's fused LM head, without Triton (CPU), scores every position, prompt included
(one step: 15 s vs 1.7 s on the tiny model, 96 s vs 54 s embedded); the script makes it score only the
completions, as on CUDA (bit-identical log-probs and gradients); `--trl-full-head`: trl as shipped.
A callback evaluates before training and every `--trl-eval-steps` steps, clock paused, and stops
training at the first step end past the budget.
Ours (a subprocess, after trl's has exited: never both at once): `selfimprove train recipe=R
eval.every=1 eval.k=0 loop.rounds=1000`; as shipped, its training time is the running sum of each
round's non-`evaluate` phase_seconds (sample, verify, select, update; checkpoint writes between phases
are not counted; like-for-like counts them, above); once it reaches the budget the run gets SIGTERM and
stops cleanly in the next round.

Evaluation, both sides: greedy accuracy on `--eval-problems` held-out problems (`task.eval_problems`),
`HFSampler.generate(greedy=True, max_new_tokens=6)` in batches of 64, correct = `task.is_correct`
(ours: the `eval/accuracy` key of each round's line in metrics.jsonl, which has `phase_seconds`).
Reported per configuration: both curves (training seconds, accuracy), each side's final accuracy, the
training time each first reached trl's final accuracy, and ratio = ours_time / trl_time (goal <= 0.5);
then both ratios, like-for-like first. Writes vs_trl_grpo.json (both configurations) to `--out`, and
per configuration `--out`/like|shipped/: vs_trl_grpo.json, vs_trl_grpo.png and both logs.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench/vs_trl_grpo.py [--budget-min 12]
      [--eval-problems 300] [--recipe grpo_oracle] [--configs like,shipped]
      [--ours-override trainer.lr=1e-4 ...] [--trl-arg loss_type=grpo ...] [--out runs/bench_vs_trl]
      (--ours-override applies to both configurations; --trl-arg to both, after the like-for-like settings)
Smoke test: OMP_NUM_THREADS=1 ... --tiny   (budget 0.3 min, 20 problems)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

Curve = list[tuple[float, float]]  # (training seconds, held-out greedy accuracy)
# our objective's normalize -> trl's loss_type; our estimator -> trl's scale_rewards (same formulas)
TRL_LOSS = {"sequence": "grpo", "token": "dapo", "constant": "dr_grpo"}
TRL_SCALE = {"grpo": "group", "drgrpo": "none"}


def plans(args: argparse.Namespace) -> dict[str, dict]:
    """What each side runs in each configuration: trl's GRPOConfig settings and evaluation cadence;
    our overrides and how our clock counts ("phases": the non-evaluate phase seconds; "wall": the wall
    time minus evaluations)."""
    shipped = {
        "trl": {"prompts": 8, "eval_steps": args.trl_eval_steps, "settings": {"learning_rate": args.trl_lr}},
        "ours": {"overrides": args.ours_override, "clock": "phases"},
    }
    if "like" not in args.configs.split(","):
        return {"shipped": shipped}
    from selfimprove.compose import compose_config
    from selfimprove.config import register

    register()
    cfg = compose_config(
        [f"recipe={args.recipe}", *(["model=tiny"] if args.tiny else []), *args.ours_override]
    )
    if cfg.objective.get("normalize") not in TRL_LOSS or cfg.selector.get("estimator") not in TRL_SCALE:
        sys.exit(f"--configs like needs a pg recipe with estimator grpo|drgrpo: {args.recipe} has none")
    if cfg.trainer.steps_per_round != 1 or cfg.trainer.scheduler != "constant" or cfg.trainer.warmup_steps:
        sys.exit(
            "--configs like: ours must be on-policy (steps_per_round=1), constant lr, no warm-up, as trl here"
        )
    like_settings = {
        "learning_rate": cfg.trainer.lr,
        "num_generations": cfg.sampler.n,
        "max_completion_length": cfg.sampler.max_new_tokens,
        "loss_type": TRL_LOSS[cfg.objective.normalize],
        "scale_rewards": TRL_SCALE[cfg.selector.estimator],
        "beta": cfg.objective.beta,
        "epsilon": cfg.objective.clip_eps,
        "weight_decay": cfg.trainer.weight_decay,
        "max_grad_norm": cfg.trainer.max_grad_norm,
    }
    like = {
        "trl": {"prompts": cfg.loop.prompts_per_round, "eval_steps": 1, "settings": like_settings},
        "ours": {"overrides": [*args.ours_override, "selector.drop_zero=false"], "clock": "wall"},
    }
    return {"like": like, "shipped": shipped}


def run_trl(args: argparse.Namespace, plan: dict, out: Path, env: dict) -> tuple[Curve, dict]:
    """The trl side in a subprocess (this script with --trl-worker); its log goes to out/trl.log."""
    result = Path(tempfile.mkdtemp(prefix="vs-trl-")) / "trl.json"
    cmd = [
        sys.executable,
        __file__,
        *sys.argv[1:],
        "--trl-worker",
        str(result),
        "--trl-plan",
        json.dumps(plan),
    ]
    t = time.perf_counter()
    with open(out / "trl.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t
    if rc != 0 or not result.exists():
        sys.exit(f"trl side failed ({rc}):\n{(out / 'trl.log').read_text()[-4000:]}")
    data = json.loads(result.read_text())
    shutil.rmtree(result.parent, ignore_errors=True)
    return [(s, a) for s, a, _ in data["curve"]], {"wall_s": wall, "steps": data["curve"][-1][2], **data}


def run_ours(args: argparse.Namespace, plan: dict, out: Path, env: dict) -> tuple[Curve, dict]:
    """Our loop in a subprocess, SIGTERM once its training seconds reach the budget."""
    run_dir = Path(tempfile.mkdtemp(prefix="vs-trl-ours-")) / "run"
    shared = [f"recipe={args.recipe}", f"eval.n_problems={args.eval_problems}", "eval.every=1", "eval.k=0"]
    shared += ["eval.batch_size=64", "eval.max_new_tokens=6", "loop.rounds=1000"]
    shared += ["model=tiny"] if args.tiny else []
    merged = {o.split("=", 1)[0]: o for o in shared + plan["overrides"]}  # overrides win, by key
    cmd = [sys.executable, "-m", "selfimprove", "train", *merged.values(), f"run.dir={run_dir}"]
    print("$ " + " ".join(cmd[1:]), flush=True)
    budget_s, curve, train_s, seen, stopped = args.budget_min * 60, [], 0.0, 0, False
    wall, started, evaluating = plan["clock"] == "wall", None, 0.0  # the wall clock: from round 0's line
    metrics = run_dir / "metrics.jsonl"
    t = time.perf_counter()
    with open(out / "ours.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None or seen < len(_lines(metrics)):
            for line in _lines(metrics)[seen:]:
                seen += 1
                row = json.loads(line)
                if "phase_seconds" not in row:  # a per-step line
                    continue
                if wall:  # all but evaluation: checkpoint writes and round bookkeeping count
                    now = time.perf_counter()
                    started = now if started is None else started
                    evaluating += row["phase_seconds"].get("evaluate", 0.0) if row["round"] > 0 else 0.0
                    train_s = now - started - evaluating
                else:
                    train_s += sum(v for k, v in row["phase_seconds"].items() if k != "evaluate")
                if "eval/accuracy" in row:
                    curve.append((train_s, row["eval/accuracy"]))
                    print(f"[ours] round {row['round']} train_s={train_s:.1f} accuracy={curve[-1][1]:.3f}")
            if train_s >= budget_s and not stopped and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # the loop stops at its next check, cleanly
                stopped = True
            time.sleep(0.1)  # also the wall clock's resolution
    elapsed = time.perf_counter() - t
    if proc.returncode != 0 or not curve:
        sys.exit(f"our side failed ({proc.returncode}):\n{(out / 'ours.log').read_text()[-4000:]}")
    if args.keep:
        print(f"our run dir kept: {run_dir}")
    else:
        shutil.rmtree(run_dir.parent, ignore_errors=True)
    return curve, {
        "wall_s": elapsed,
        "overrides": list(merged.values()),
        "sigterm": stopped,
        "clock": plan["clock"],
    }


def _lines(path: Path) -> list[str]:
    """Complete lines only: the last one may be half written."""
    if not path.exists():
        return []
    text = path.read_text()
    return text[: text.rfind("\n") + 1].splitlines()


def first_reach(curve: Curve, target: float) -> float | None:
    """Training seconds of the first point at or above `target`; None if never."""
    return next((s for s, a in curve if a >= target - 1e-12), None)


def plot(curves: dict[str, Curve], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.plot([s / 60 for s, _ in curve], [a for _, a in curve], marker="o", ms=3, label=name)
    ax.axhline(target, ls="--", c="gray", lw=1, label=f"trl final {target:.3f}")
    ax.set(xlabel="training minutes (evaluation excluded)", ylabel="held-out greedy accuracy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


NAMES = {"like": "like-for-like", "shipped": "as shipped"}


def compare(args: argparse.Namespace, name: str, plan: dict, env: dict) -> dict:
    """One configuration: each side in turn, both curves printed, the ratio; files under --out/name."""
    out = args.out / name
    out.mkdir(parents=True, exist_ok=True)
    curves: dict[str, Curve] = {}
    info: dict[str, dict] = {}
    for side in args.sides.split(","):
        print(
            f"--- {NAMES[name]}, {side}: {args.budget_min} min of training, {args.eval_problems} held-out",
            flush=True,
        )
        run = run_trl if side == "trl" else run_ours
        curves[side], info[side] = run(args, plan[side], out, env)
    for side, curve in curves.items():
        print(f"\n{side} (wall {info[side]['wall_s']:.0f} s incl. load and evaluation)\n  seconds  accuracy")
        print("\n".join(f"  {s:7.1f}  {a:8.3f}" for s, a in curve))
    target = curves["trl"][-1][1] if "trl" in curves else None
    reach = {side: first_reach(c, target) for side, c in curves.items()} if target is not None else {}
    ratio = None
    if reach.get("ours") is not None and reach.get("trl"):
        ratio = reach["ours"] / reach["trl"]
    print()
    for side, curve in curves.items():
        when = "not reached" if reach.get(side) is None else f"{reach[side]:.1f} s"
        when = f"; first reached trl's final: {when}" if target is not None else ""
        print(f"{side:5s} final accuracy {curve[-1][1]:.3f}{when}")
    summary = {"plan": plan, "curves": curves, "info": info, "target": target, "time_to_target": reach}
    summary["ratio"] = ratio
    if target is not None and "ours" in curves:
        note = "" if reach["trl"] else " (trl's final accuracy was reached at 0 s: no ratio)"
        summary["line"] = f"{'n/a' if ratio is None else f'{ratio:.3f}'} to reach {target:.3f}{note}"
        print(f"{NAMES[name]}: ratio ours_time / trl_time {summary['line']} (goal <= 0.5)")
    (out / "vs_trl_grpo.json").write_text(json.dumps(summary, indent=1, default=str))
    if target is not None:
        plot(curves, target, out / "vs_trl_grpo.png")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-min", type=float, default=None, help="training minutes per side (12; tiny 0.3)")
    ap.add_argument("--eval-problems", type=int, default=None, help="held-out problems (300; tiny 20)")
    ap.add_argument("--recipe", default="grpo_oracle")
    ap.add_argument("--configs", default="like,shipped", help="like-for-like and/or as shipped, in order")
    ap.add_argument("--ours-override", action="append", default=[], help="key=value for our side")
    ap.add_argument("--trl-lr", type=float, default=1e-4, help="trl's lr as shipped (like-for-like: ours)")
    ap.add_argument("--trl-eval-steps", type=int, default=10, help="trl as shipped: evaluate every K steps")
    ap.add_argument("--trl-arg", action="append", default=[], help="GRPOConfig key=value (JSON value)")
    ap.add_argument("--trl-full-head", action="store_true", help="trl untouched: CPU scores every position")
    ap.add_argument("--partial-reward", action="store_true", help="trl: task.reward's partial credit")
    ap.add_argument("--sides", default="trl,ours", help="which to run, in order (one at a time)")
    ap.add_argument("--tiny", action="store_true", help="random tiny model, small budget: a smoke test")
    ap.add_argument("--keep", action="store_true", help="keep our run dir")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_vs_trl"))
    ap.add_argument("--trl-worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--trl-plan", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not set(args.sides.split(",")) <= {"trl", "ours"}:
        ap.error(f"--sides: {args.sides!r}, expected trl and/or ours, comma-separated")
    if not set(args.configs.split(",")) <= set(NAMES):
        ap.error(f"--configs: {args.configs!r}, expected like and/or shipped, comma-separated")
    args.budget_min = args.budget_min or (0.3 if args.tiny else 12.0)
    args.eval_problems = args.eval_problems or (20 if args.tiny else 300)
    if args.trl_worker:
        from vs_trl_worker import trl_worker  # beside this script

        return trl_worker(args, args.trl_worker)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    every = plans(args)
    results = {name: compare(args, name, every[name], env) for name in args.configs.split(",")}
    print("\nratio ours_time / trl_time to reach trl's final accuracy (goal <= 0.5):")
    for name in [n for n in NAMES if n in results]:  # like-for-like leads
        print(f"  {NAMES[name]:>13}: {results[name].get('line', 'n/a (needs both sides)')}")
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "configs": results}
    (args.out / "vs_trl_grpo.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"wrote {args.out}/: vs_trl_grpo.json; per configuration, its curves (.png when trl ran) and logs")


if __name__ == "__main__":
    main()
