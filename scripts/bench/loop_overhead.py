"""Loop overhead: the share of a round's training part spent outside the model's compute.

Runs a short real loop (`python -m selfimprove train ...`) in a temporary run dir and reads its
metrics.jsonl. Per round (round 0, evaluation only, is skipped):

    overhead = (round_seconds - generate - forward - train - evaluate) / (round_seconds - evaluate)

goal <= 5%. What each term holds (see loop.py, phases.py):
  round_seconds  the SUM of phase_seconds (sample, verify, select, update, evaluate); not wall clock.
  generate       each HFSampler.generate call while sampling: model.generate + the sampler's own
                 padding, stats stacking and decoding.
  forward        each base-model scoring call: padding, forward, log_softmax, gather, tolist.
  train          the whole update() call: collation, host->device copies, forward, loss, backward,
                 grad clipping, optimizer/scheduler step, zero_grad, loss all-reduce, and after_step
                 (EMA update, a metrics.jsonl line, progress bar, stop check) for every step.
So the numerator is what is left inside the phases: problem building, prompt encoding, rewards and
answer extraction, Parquet writes and re-reads, scorers, selection and summaries, phase setup.
Bookkeeping hidden inside generate/train counts as compute here, so the figure is a LOWER bound on
the loop's own cost. Work between phases is in no phase at all: the checkpoint saved after the
update, train_metrics.json, the round's metrics line and metrics.json. To show it, the script also
takes each round's wall clock from the mtimes of rounds/rNNNN/metrics.json (round r-1's file to
round r's) and reports `unphased` = wall - round_seconds and the overhead with it included.

Device: the script picks none; the loop runs on the CUDA GPU when one is visible (the Engine's
Accelerator), else the CPU, and the script prints which. The loop's timers do not synchronize, but
nearly nothing is left queued when they are read: generate and forward return host lists, and the
update reads each micro-batch's loss with .item() (only the last step's optimizer and EMA kernels
may still be running when `train` is read).

Run:  . .venv/bin/activate; HF_HUB_OFFLINE=1 python scripts/bench/loop_overhead.py [--embedded]
      [--keep] [key=value ...]   (extra Hydra overrides replace the defaults with the same key)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

COMMON = [
    "recipe=label_free",
    "eval.k=0",
    "eval.before=true",
    "eval.unlabelled_problems=0",
    "eval.select_by=null",
]
TINY = ["model=tiny", "loop.rounds=2", "eval.n_problems=32"]
EMBEDDED = ["model=smollm2_135m", "loop.rounds=2", "loop.prompts_per_round=16", "eval.n_problems=32"]


def overrides(embedded: bool, extra: list[str]) -> list[str]:
    merged = {o.split("=", 1)[0]: o for o in COMMON + (EMBEDDED if embedded else TINY) + extra}
    return list(merged.values())


def device_used() -> str:
    """What the loop will run on: the Engine's rule (cuda when available), with the GPU's name."""
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return "cpu"


def report(run_dir: Path) -> None:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rounds = [r for r in map(json.loads, lines) if "round_seconds" in r]
    mtime = {
        r["round"]: (run_dir / "rounds" / f"r{r['round']:04d}" / "metrics.json").stat().st_mtime
        for r in rounds
    }
    head = "round  round_s  eval_s  train_part  generate  forward   train  other  overhead  | wall_part  unphased  overhead+unphased"
    print(head)
    figs, figs_wall = [], []
    for r in rounds:
        ph, cs = r["phase_seconds"], r["compute_seconds"] or {}
        if "sample" not in ph:
            continue
        ev = ph.get("evaluate", 0.0)
        part = r["round_seconds"] - ev
        gen, fwd, trn = (cs.get(k, 0.0) for k in ("generate", "forward", "train"))
        other = part - gen - fwd - trn
        figs.append(other / part)
        wall_part = unphased = None
        line = (
            f"{r['round']:5d}  {r['round_seconds']:7.2f}  {ev:6.2f}  {part:10.2f}  {gen:8.2f}  {fwd:7.2f}"
            f"  {trn:6.2f}  {other:5.2f}  {100 * other / part:7.2f}%  |"
        )
        if r["round"] - 1 in mtime:
            wall_part = mtime[r["round"]] - mtime[r["round"] - 1] - ev
            unphased = wall_part - part
            figs_wall.append((other + unphased) / wall_part)
            line += f"  {wall_part:9.2f}  {unphased:8.2f}  {100 * figs_wall[-1]:16.2f}%"
        print(line)
        print("       phase_seconds: " + ", ".join(f"{k}={v:.2f}" for k, v in ph.items()))
    if not figs:
        raise SystemExit("no training rounds in metrics.jsonl")
    print(f"median overhead (within phases): {100 * statistics.median(figs):.2f}% (goal <= 5%)")
    if figs_wall:
        print(
            f"median overhead incl. unphased (checkpoint, metrics writes): {100 * statistics.median(figs_wall):.2f}%"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embedded", action="store_true", help="the embedded SmolLM2-135M at small sizes")
    ap.add_argument("--keep", action="store_true", help="keep the run dir")
    ap.add_argument("extra", nargs="*", help="more Hydra overrides")
    args = ap.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="selfimprove-overhead-")) / "run"
    cmd = [
        sys.executable,
        "-m",
        "selfimprove",
        "train",
        *overrides(args.embedded, args.extra),
        f"run.dir={run_dir}",
    ]
    print("$ HF_HUB_OFFLINE=1 python " + " ".join(cmd[1:]), flush=True)
    print(f"device: {device_used()}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    print(f"(run took {time.perf_counter() - t:.1f} s wall, incl. start-up and model load)")
    try:
        report(run_dir)
    finally:
        if args.keep:
            print(f"run dir kept: {run_dir}")
        else:
            shutil.rmtree(run_dir.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
