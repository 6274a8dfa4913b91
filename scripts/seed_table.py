"""One Markdown row per sweep folder: held-out greedy accuracy over its seeds, the run's own final
round and the round each model-selection rule reports (the label-free information score; the 50
labelled dev problems), as median / worst / best gain over the starting model, in points.

Run:  .venv/bin/python scripts/seed_table.py SWEEP_DIR[=LABEL] ...
(a sweep folder is what `selfimprove train -m seed=0,1,... run.dir=SWEEP_DIR` writes)
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from selfimprove.metrics import select_round
from selfimprove.report import ACCURACY, find_runs

RULES = [("final round", None), ("information", "unlabelled/information"), ("dev50", "dev/accuracy")]


def spread(values: list[float]) -> str:
    if not values:
        return "—"
    held = sum(v >= 0.15 for v in values)
    return (
        f"{100 * statistics.median(values):+.1f} / {100 * min(values):+.1f} / {100 * max(values):+.1f} "
        f"({held} of {len(values)} ≥ +15)"
    )


def row(folder: Path, label: str) -> str:
    runs = [r for r in find_runs([folder]) if r.series(ACCURACY)[0][:1] == [0]]
    cells = [label, str(len(runs))]
    for _, key in RULES:
        gains, below_peak = [], []
        for run in runs:
            rounds, acc = run.series(ACCURACY)
            by_round = dict(zip(rounds, acc))
            chosen = rounds[-1]
            if key is not None:
                chosen = select_round([{"round": r, **m} for r, m in run.rounds.items()], key).get(
                    "selected/round"
                )
            if chosen is None:
                continue
            gains.append(by_round[chosen] - by_round[0])
            below_peak.append(by_round[chosen] - max(acc))
        cells.append(spread(gains))
        cells.append("—" if not below_peak else f"{100 * min(below_peak):+.1f}")
    start = statistics.median(r.series(ACCURACY)[1][0] for r in runs) if runs else float("nan")
    return f"| {' | '.join(cells)} | {100 * start:.1f}% |"


def main() -> None:
    header = ["configuration", "seeds"]
    for name, _ in RULES:
        header += [f"{name}: gain median / worst / best", f"{name}: worst − own peak"]
    print("| " + " | ".join(header + ["start"]) + " |")
    print("|" + "---|" * (len(header) + 1))
    for arg in sys.argv[1:]:
        path, _, label = arg.partition("=")
        print(row(Path(path), label or Path(path).name))


if __name__ == "__main__":
    main()
