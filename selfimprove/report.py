"""`selfimprove report RUN_DIR [RUN_DIR ...] out=FILE.html`: one static HTML page (plots embedded, no
server) and FILE.json beside it with the same numbers, for one run or many (a sweep folder, a list).

One run: held-out accuracy over rounds (greedy, maj@k, pass@k; raw and EMA), the training samples'
accuracy, reward, agreement, distinct answers, entropy, KL, the label-free model-selection score,
phase seconds and memory, and sample completions per round. Several runs: per round the mean and the
min-max band across runs, and a table of each run's start, peak, final and reported accuracy, with
the median, worst and best gain. A run in progress, killed mid-round or with a torn last metrics line
is reported as far as it got (the page says so).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from selfimprove.config import ConfigError

ACCURACY = "eval/accuracy"
BANDED = [ACCURACY, "sample/accuracy", "select/reward_mean", "unlabelled/information"]


@dataclass
class Run:
    name: str
    folder: Path
    recipe: str
    seed: int | None
    planned_rounds: int | None
    rounds: dict[int, dict] = field(default_factory=dict)  # round -> flat metrics
    notes: list[str] = field(default_factory=list)
    selected: dict = field(default_factory=dict)

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        points = [(r, m[metric]) for r, m in sorted(self.rounds.items()) if _number(m.get(metric))]
        return [r for r, _ in points], [v for _, v in points]

    def summary(self) -> dict:
        """Start, peak, final and the reported round's held-out accuracy (the selected round where the
        run selects one, else the last evaluated)."""
        rounds, acc = self.series(ACCURACY)
        if not acc:
            return {"evaluated_rounds": 0}
        peak = max(range(len(acc)), key=lambda i: (acc[i], -rounds[i]))
        reported_round = self.selected.get("selected/round", rounds[-1])
        reported = dict(zip(rounds, acc)).get(reported_round, acc[-1])
        start = acc[0] if rounds[0] == 0 else None
        return {
            "evaluated_rounds": len(acc),
            "start": start,
            "peak": acc[peak],
            "peak_round": rounds[peak],
            "final": acc[-1],
            "final_round": rounds[-1],
            "final_minus_peak": acc[-1] - acc[peak],
            "reported": reported,
            "reported_round": reported_round,
            "reported_by": self.selected.get("selected/by", "last round"),
            "reported_minus_peak": reported - acc[peak],
            "gain": None if start is None else reported - start,
            "final_gain": None if start is None else acc[-1] - start,
        }


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _flat(record: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def load_run(folder: Path, name: str) -> Run:
    """A run folder's rounds from metrics.jsonl (round lines; steps' lines averaged into their round);
    unreadable lines are skipped and noted (a run killed while writing leaves a torn last line)."""
    cfg = OmegaConf.load(folder / "config.yaml")
    run = Run(name, folder, str(cfg.get("recipe")), cfg.get("seed"), OmegaConf.select(cfg, "loop.rounds"))
    steps: dict[int, dict[str, list[float]]] = {}
    path = folder / "metrics.jsonl"
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            run.notes.append(f"{path}:{number}: not a JSON line (torn by a kill?), skipped")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("round"), int):
            continue
        if "round_seconds" in record:
            run.rounds[record["round"]] = _flat(record)
        elif "train/loss" in record:
            for k, v in record.items():
                if _number(v) and k not in ("round", "step"):
                    steps.setdefault(record["round"], {}).setdefault(k, []).append(v)
    for r, metrics in steps.items():  # a step metric (pg/kl) is its round's mean
        if r in run.rounds:
            run.rounds[r].update(
                {
                    k: v
                    for k, v in ((k, statistics.fmean(vs)) for k, vs in metrics.items())
                    if k not in run.rounds[r]
                }
            )
    if (folder / "selected.json").exists():
        run.selected = json.loads((folder / "selected.json").read_text())
    done = max(run.rounds, default=-1)
    if run.planned_rounds is not None and done < run.planned_rounds:
        run.notes.append(f"{name}: {done} of {run.planned_rounds} rounds recorded (in progress or stopped)")
    return run


def find_runs(paths: list[Path]) -> list[Run]:
    """Run folders (those holding config.yaml) given directly or anywhere under a given folder."""
    runs: list[Run] = []
    for path in paths:
        if not path.exists():
            raise ConfigError(f"report: {path} does not exist")
        folders = (
            [path] if (path / "config.yaml").exists() else sorted(p.parent for p in path.rglob("config.yaml"))
        )
        folders = [f for f in folders if "checkpoints" not in f.parts]
        if not folders:
            raise ConfigError(f"report: no run under {path} (a run folder holds config.yaml)")
        for f in folders:
            name = str(f.relative_to(path)) if f != path else f.name
            runs.append(load_run(f, name if len(paths) == 1 else f"{path.name}/{name}".rstrip("/.")))
    return runs


def aggregate(runs: list[Run]) -> dict:
    """Per round, mean / min / max across runs of the banded metrics; the gains' median, worst, best."""
    per_round: dict[str, dict[int, dict]] = {}
    for metric in BANDED:
        by_round: dict[int, list[float]] = {}
        for run in runs:
            for r, v in zip(*run.series(metric)):
                by_round.setdefault(r, []).append(v)
        per_round[metric] = {
            r: {"mean": statistics.fmean(vs), "min": min(vs), "max": max(vs), "runs": len(vs)}
            for r, vs in sorted(by_round.items())
        }
    out: dict = {"per_round": per_round}
    for key in ("gain", "final_gain", "reported_minus_peak"):
        values = [s[key] for s in (run.summary() for run in runs) if s.get(key) is not None]
        if values:
            out[key] = {
                "median": statistics.median(values),
                "worst": min(values),
                "best": max(values),
                "runs": len(values),
            }
    return out


def warnings(runs: list[Run]) -> list[str]:
    found = [note for run in runs for note in run.notes]
    recipes = sorted({run.recipe for run in runs})
    if len(recipes) > 1:
        found.append(f"runs of different recipes ({', '.join(recipes)}): aligned by round")
    planned = sorted({run.planned_rounds for run in runs if run.planned_rounds is not None})
    if len(planned) > 1:
        found.append(f"runs of different round counts ({', '.join(map(str, planned))}): aligned by round")
    return found


def sample_table(run: Run, per_round: int = 4) -> list[dict]:
    """A few prompts per round with their samples' answers (counted) and the reference answer."""
    import pyarrow.parquet as pq

    rows = []
    for folder in sorted((run.folder / "rounds").glob("r*/samples")):
        shards = sorted(folder.glob("*.parquet"))
        if not shards:
            continue
        try:
            table = pq.read_table(
                shards[0],
                columns=["prompt_id", "prefill", "messages", "completion", "answer", "target", "correct"],
            ).to_pylist()
        except Exception as e:  # a torn shard of a killed run: say so, keep going
            run.notes.append(f"{shards[0]}: unreadable ({type(e).__name__}), samples not shown")
            continue
        by_prompt: dict[str, list[dict]] = {}
        for row in table:
            by_prompt.setdefault(row["prompt_id"], []).append(row)
        for samples in list(by_prompt.values())[:per_round]:
            first = samples[0]
            prompt = first["messages"][-1]["content"] if first["messages"] else ""
            rows.append(
                {
                    "round": int(folder.parent.name[1:]),
                    "prompt": prompt + (f" → {first['prefill']}" if first["prefill"] else ""),
                    "target": first["target"],
                    "completions": [(s["completion"], bool(s["correct"])) for s in samples],
                }
            )
    return rows


def main(args: list[str]) -> None:
    options = dict(a.split("=", 1) for a in args if a.split("=", 1)[0] in ("out", "select_by"))
    paths = [Path(a) for a in args if a.split("=", 1)[0] not in options]
    if "out" not in options or not paths:
        raise ConfigError(
            "report: usage: selfimprove report RUN_DIR [RUN_DIR ...] out=FILE.html [select_by=METRIC]"
        )
    out = options["out"]
    runs = find_runs(paths)
    if "select_by" in options:  # the round each run would report, selecting by this metric afterwards
        from selfimprove.metrics import select_round

        for run in runs:
            run.selected = select_round(
                [{"round": r, **m} for r, m in run.rounds.items()], options["select_by"]
            )
    summary = aggregate(runs)
    samples = sample_table(runs[0]) if len(runs) == 1 else []
    found = warnings(runs)
    from selfimprove.report_page import render

    page = render(runs, summary, found, samples)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    numbers = {
        "runs": [
            {
                "name": r.name,
                "folder": str(r.folder),
                "recipe": r.recipe,
                "seed": r.seed,
                "planned_rounds": r.planned_rounds,
                "summary": r.summary(),
                "selected": r.selected,
                "rounds": {str(k): v for k, v in sorted(r.rounds.items())},
            }
            for r in runs
        ],
        "aggregate": summary,
        "warnings": found,
    }
    for path, text in (
        (target, page),
        (target.with_suffix(".json"), json.dumps(numbers, indent=1, default=str)),
    ):
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    for w in found:
        print(f"[selfimprove] {w}", file=sys.stderr)
    print(
        f"[selfimprove] report of {len(runs)} run(s): {target} and {target.with_suffix('.json')}",
        file=sys.stderr,
    )
