"""Plots round metrics of one or more runs side by side: one panel per metric, one line per run.

Reads each run's metrics.jsonl (the round lines, those holding the metric), so it works on runs in
progress too. Used for the curated-retraining figure in docs/results_methods.md.

Run:  .venv/bin/python scripts/plot_runs.py RUN_DIR[=LABEL] ... --metrics score/self_certainty,sample/kl_to_base
      --out FILE.png [--title TEXT]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def round_series(run_dir: Path, metric: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of `metric` from a run's metrics.jsonl round lines."""
    rounds, values = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        value = record.get(metric)
        if "train/loss" in record or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue  # an optimizer step's line, or a round without this metric
        rounds.append(record["round"])
        values.append(float(value))
    return rounds, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="RUN_DIR or RUN_DIR=LABEL")
    parser.add_argument("--metrics", required=True, help="comma-separated metrics.jsonl keys")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--title", default=None)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in args.metrics.split(",") if m]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for spec in args.runs:
        folder, _, label = spec.partition("=")
        for ax, metric in zip(axes[0], metrics):
            rounds, values = round_series(Path(folder), metric)
            ax.plot(rounds, values, marker="o", label=label or Path(folder).name)
    for ax, metric in zip(axes[0], metrics):
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if args.title:
        fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
