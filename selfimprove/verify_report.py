"""`selfimprove verify-report [RUN_DIR | model=...] task=... out=DIR [prompts=100] [verifiers=a,b,c]`.

Which verifier should pick among N answers? Samples the model on held-out problems (the `sample`
command's own code and seeds), runs each verifier config on the samples, timing each on its own, and
compares its scores with the task's checker: AUROC pooled over all samples and within prompts (only
pairs of one prompt's samples: what best-of-N needs), best-of-N accuracy against a random sample,
majority vote and pass@N, the calibration of probability-valued scores (P(True)), and its cost.
Writes DIR/verify_report.json, DIR/verify_report.md, DIR/samples.parquet and two plots.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from selfimprove import metrics
from selfimprove.compose import CONFIG_DIR, one_line_errors, pop_option, split_args
from selfimprove.sample import Session, open_session, session_options, write_rows

LABELS = ("ground_truth",)  # the label the scores are compared against: never one of the scorers
# left out unless named: why (not a score; uses the labels; needs a run's state)
NOT_BY_DEFAULT = {
    "graded": "uses the labels (RandomCalculation's partial credit)",
    "reference_base": "not a score (per-token log-probs for a KL)",
    "reference_ema": "not a score (per-token log-probs for a KL)",
    "ema_teacher": "needs a run's EMA weights (ema.enabled=true)",
}
# maj@k on the curve: exact over every k-subset when there are at most this many, else this many
# subsets drawn with a fixed seed per prompt
MAJORITY_DRAWS = 64
BINS = 10  # reliability bins (and ECE's) on [0, 1]
# Overrides meant for the verifier configs (verifiers.ptrue.shots=4, +verifier@verifiers.x=ptrue):
# applied to the report's verifiers, not to the model's config.
_VERIFIER_ARG = re.compile(r"^[~+]*(verifiers\.|verifier@verifiers\.)")


def available() -> list[str]:
    """The verifier configs there are (configs/verifier/*.yaml), by name."""
    return sorted(p.stem for p in (Path(CONFIG_DIR) / "verifier").glob("*.yaml"))


def verifier_configs(requested: str | None, overrides: list[str]) -> tuple[DictConfig, dict[str, str]]:
    """The verifier configs to report on (composed by Hydra like a recipe's `/verifier@verifiers.NAME`,
    with the user's `verifiers.*` overrides) and the ones left out by default, with why.

    By default every config except the label (`ground_truth`), those in `NOT_BY_DEFAULT` and those
    with a required `???` value still unset; named in `verifiers=`, a config must be complete (its missing key is the error)."""
    from hydra import compose, initialize_config_dir

    from selfimprove.config import ConfigError

    names = available()
    if requested is not None:
        chosen = list(dict.fromkeys(n.strip() for n in requested.split(",") if n.strip()))
        unknown = [n for n in chosen if n not in names]
        if not chosen or unknown:
            what = f"no verifier config named {unknown[0]!r}" if unknown else "name at least one"
            raise ConfigError(f"verifiers: {what} (available: {', '.join(names)})")
    else:
        chosen = [n for n in names if n not in LABELS and n not in NOT_BY_DEFAULT]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name=None, overrides=[f"+verifier@verifiers.{n}={n}" for n in chosen] + overrides
        )
    skipped: dict[str, str] = {}
    with open_dict(cfg):
        for name in list(cfg.verifiers):
            missing = sorted(OmegaConf.missing_keys(cfg.verifiers[name]))
            if missing and requested is None:
                skipped[name] = f"needs {missing[0]}=..."
                del cfg.verifiers[name]
            elif missing:
                raise ConfigError(f"{missing[0]}: missing value (set it: {missing[0]}=...)")
    if not cfg.verifiers:
        raise ConfigError(f"verifiers: none left to report on (available: {', '.join(names)})")
    for label in LABELS:
        if requested is None and label in names:
            skipped[label] = "the label the scores are compared against"
    if requested is None:
        skipped.update({n: why for n, why in NOT_BY_DEFAULT.items() if n in names})
    return cfg, skipped


def build_scorers(cfg: DictConfig, verifiers: DictConfig, task: Any) -> list[tuple[str, Any]]:
    """(config name, scorer) in the order they must run (a combined score after its parts), checked
    like a recipe's verifiers before any model loads. The verifiers replace the config's own."""
    from selfimprove.config import ConfigError, _check_target, build_stages
    from selfimprove.stages import order_stages

    with open_dict(cfg):
        cfg.verifiers = verifiers.verifiers
    for name, node in cfg.verifiers.items():
        _check_target(f"verifiers.{name}", OmegaConf.to_container(node, resolve=True))
    nodes = {f"verifiers.{k}": v for k, v in cfg.verifiers.items()}
    built = [(path.removeprefix("verifiers."), s) for path, s in build_stages(nodes, task).items()]
    by_column: dict[str, str] = {}
    for name, scorer in built:
        if scorer.column in by_column:
            raise ConfigError(
                f"verifiers: {by_column[scorer.column]} and {name} both write {scorer.column} (rename one: "
                f"verifiers.{name}.name=...)"
            )
        by_column[scorer.column] = name
    try:
        ordered = order_stages([s for _, s in built])
    except ValueError as e:
        raise ConfigError(f"verifiers: {e}; name them in verifiers=") from None
    return [(next(n for n, s in built if s is scorer), scorer) for scorer in ordered]


def is_probability(name: str, scorer: Any) -> bool:
    """Scores meant as P(correct): P(True) configs (names starting with `ptrue`), or a scorer that says
    so with `probability = True`."""
    return (
        getattr(scorer, "probability", False) is True
        or name.startswith("ptrue")
        or str(getattr(scorer, "name", "")).startswith("ptrue")
    )


def score_each(session: Session, named: list[tuple[str, Any]], rows: list[dict]) -> dict[str, float]:
    """Runs each scorer over the units (as `verify_units` would: whole prompts, the same seeds), adding
    what it writes to `rows`; returns its seconds. Each sees only the sampled columns and those it
    reads, so it pays for its own work (loglik_base_mean does not reuse loglik_base's forward pass)."""
    from selfimprove.logging import progress
    from selfimprove.stages import CORE_COLUMNS

    bounds, start = [], 0
    for size in session.unit_sizes():
        bounds.append((start, start + size))
        start += size
    seconds: dict[str, float] = {}
    for name, scorer in named:
        keep = CORE_COLUMNS | set(scorer.reads)
        bar = progress(len(bounds), f"score {name}")
        seconds[name] = 0.0
        for unit, (a, b) in enumerate(bounds):
            given = [{k: v for k, v in r.items() if k in keep} for r in rows[a:b]]
            ctx = session.context(unit, "verify")
            t = time.perf_counter()
            scored = scorer(given, ctx)
            seconds[name] += time.perf_counter() - t
            if len(scored) != len(given):
                raise RuntimeError(f"verifier {name} returned {len(scored)} rows for {len(given)}")
            for row, out in zip(rows[a:b], scored):
                row.update({c: out[c] for c in scorer.writes if c in out})
            bar.update(1)
        bar.close()
    return seconds


def ks_of(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [k for k in (2**i for i in range(n.bit_length())) if k <= n]
    return ks if ks[-1] == n else [*ks, n]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _reference(groups: list[list[dict]], ks: list[int], sampling_seconds: float, per_1000: float) -> tuple:
    """What is the same for every scorer: (reference numbers at N, curves against k)."""
    correct = [sum(bool(r["correct"]) for r in g) for g in groups]
    votes = [[(r["answer"], bool(r["correct"])) for r in g] for g in groups]
    random_sample = _mean([c / len(g) for c, g in zip(correct, groups)])
    reference = {
        "random": random_sample,
        "majority": metrics.maj_at_k(dict(enumerate(votes))),
        "pass_at_n": _mean([metrics.pass_at_k(len(g), c, len(g)) for c, g in zip(correct, groups)]),
        "prompts_with_both": sum(0 < c < len(g) for c, g in zip(correct, groups)),
        "sampling_seconds": sampling_seconds,
        "sampling_s_per_1000": sampling_seconds * per_1000,
    }
    curves = {
        "k": ks,
        "random": [random_sample] * len(ks),
        # seeded by the prompt's position: the same subsets on every run
        "majority": [
            _mean([metrics.majority_of_k(v, k, MAJORITY_DRAWS, seed=i) for i, v in enumerate(votes)])
            for k in ks
        ],
        "pass": [_mean([metrics.pass_at_k(len(g), c, k) for c, g in zip(correct, groups)]) for k in ks],
        "majority_draws": MAJORITY_DRAWS,
    }
    return reference, curves


def _scorer_row(name: str, scorer: Any, rows: list[dict], groups: list[list[dict]], ks: list[int]) -> dict:
    """One scorer's numbers (no timing)."""
    col = scorer.column
    scores = [float(r[col]) for r in rows]
    labels = [bool(r["correct"]) for r in rows]
    within, both = metrics.auroc_within(scores, labels, [r["prompt_id"] for r in rows])
    curve = [
        _mean([metrics.best_of_k([r[col] for r in g], [r["correct"] for r in g], k) for g in groups])
        for k in ks
    ]
    probability = is_probability(name, scorer)
    finite = [(s, y) for s, y in zip(scores, labels) if math.isfinite(s)]
    in_unit = bool(finite) and all(0.0 <= s <= 1.0 for s, _ in finite)
    note = None
    if probability and not in_unit:
        note = "declared a probability but " + (
            "no score is finite" if not finite else "scores fall outside [0, 1]"
        )
        note += ": no ECE"
    probs, hits = [s for s, _ in finite], [y for _, y in finite]
    calibrated = probability and in_unit
    return {
        "name": name,
        "column": col,
        "probability": probability,
        "uses_labels": bool({"correct", "reward", "target"} & set(scorer.reads)),
        "auroc_pooled": metrics.auroc(scores, labels),
        "auroc_within": within,
        "prompts_with_both": both,
        "best_of_n": curve[-1],
        "best_of_k": curve,
        "ece": metrics.ece(probs, hits, BINS) if calibrated else None,
        "reliability": metrics.reliability_bins(probs, hits, BINS) if calibrated else None,
        "non_finite_scores": len(scores) - len(finite),
        "note": note,
    }


def summarize(
    rows: list[dict], named: list[tuple[str, Any]], seconds: dict[str, float], sampling_seconds: float
) -> dict:
    """The report's numbers from scored rows: pure, so tested on made-up rows."""
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_prompt[row["prompt_id"]].append(row)
    groups = [sorted(g, key=lambda r: r["sample_idx"]) for g in by_prompt.values()]
    if len({len(g) for g in groups}) != 1:
        raise ValueError(f"prompts have different numbers of samples: {sorted({len(g) for g in groups})}")
    n = len(groups[0])
    ks = ks_of(n)
    per_1000 = 1000 / len(rows)
    reference, curves = _reference(groups, ks, sampling_seconds, per_1000)
    scorers = [
        {
            **_scorer_row(name, scorer, rows, groups, ks),
            "seconds": seconds[name],
            "s_per_1000": seconds[name] * per_1000,
        }
        for name, scorer in named
    ]
    return {
        "n_prompts": len(groups),
        "n": n,
        "n_samples": len(rows),
        "reference": reference,
        "ece_bins": BINS,
        "curves": curves,
        "scorers": scorers,
    }


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _describe_model(cfg: DictConfig) -> str:
    m = cfg.model
    names = {"tiny": "tiny (a randomly initialised test model)", "embedded": "SmolLM2-135M-Instruct"}
    return names.get(m.kind, f"{m.kind}: {m.path}")


def _describe_task(cfg: DictConfig) -> str:
    node = OmegaConf.to_container(cfg.task, resolve=True)
    args = " ".join(f"{k}={v}" for k, v in node.items() if k != "_target_")
    return f"{node['_target_'].rpartition('.')[2]}({args})"


def _command(argv: list[str]) -> str:
    """The command line as typed when run from the CLI, else rebuilt from the arguments."""
    if sys.argv[1:2] == ["verify-report"]:
        return shlex.join(["selfimprove", *sys.argv[1:]])
    return shlex.join(
        ["selfimprove", "verify-report", *(a for a in argv if not a.startswith("hydra.searchpath="))]
    )


def run(
    run_dir: Path | None, overrides: list[str], *, out: Path, requested: str | None, command: str, **options
) -> dict:
    """Samples, scores with each verifier, and writes the report (rank 0); returns it."""
    import tempfile

    from selfimprove import distributed as dist
    from selfimprove.report_plots import markdown, plot_best_of_n, plot_reliability

    mine = [a for a in overrides if _VERIFIER_ARG.match(a)]
    rest = [a for a in overrides if a not in mine]
    verifiers, skipped = verifier_configs(requested, mine)
    named: list[tuple[str, Any]] = []

    def scorers(cfg: DictConfig, task: Any) -> list:
        named.extend(build_scorers(cfg, verifiers, task))
        return [s for _, s in named]

    session = open_session(run_dir, rest, scorers=scorers, **options)
    with tempfile.TemporaryDirectory(prefix="selfimprove-report-") as tmp:
        t = time.perf_counter()
        rows = session.draw(Path(tmp) / "samples")
        sampling = time.perf_counter() - t
        seconds = score_each(session, named, rows)
    rows = session.finish(rows)
    report = {
        "command": command,
        "model": _describe_model(session.cfg),
        "task": _describe_task(session.cfg),
        "run_dir": str(run_dir) if run_dir is not None else None,
        "weights": options["weights"],
        "split": options["split"],
        "temperature": session.cfg.sampler.temperature,
        "max_new_tokens": session.cfg.sampler.max_new_tokens,
        "verifiers": OmegaConf.to_container(session.cfg.verifiers, resolve=True),
        "skipped": skipped,
        **summarize(rows, named, seconds, sampling),
    }
    if not dist.is_main():
        return report
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / "samples.parquet", rows)
    files = {"json": "verify_report.json", "markdown": "verify_report.md", "samples": "samples.parquet"}
    files["best_of_n"] = plot_best_of_n(report, out / "best_of_n.png").name
    drawn = plot_reliability(report, out / "reliability.png")
    files["reliability"] = drawn.name if drawn is not None else None
    report["files"] = files
    _write_text(out / "verify_report.json", json.dumps(_clean(report), indent=1, allow_nan=False) + "\n")
    _write_text(out / "verify_report.md", markdown(report))
    return report


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="selfimprove verify-report",
        description="Which verifier picks the right answer among N? Sample held-out problems, score them "
        "with each verifier config, compare with the task's checker; a JSON and a Markdown report and plots.",
        epilog=(
            "options (key=value): out=DIR (required), prompts=100, verifiers=NAME,NAME "
            "(configs/verifier/*.yaml; default: all but ground_truth, graded, reference_*, ema_teacher and those with an unset ??? value), "
            "split=eval|train, weights=raw|ema; verifiers.NAME.KEY=VALUE sets a verifier's option "
            "(verifiers.reward_model.path=DIR); any other key=value overrides the model's config, e.g. "
            "sampler.n=8 task=jsonl task.path=problems.jsonl. Without RUN_DIR the config is composed as for "
            "train: model=... recipe=... Meant for one process; launched on several ranks, they share the "
            "sampling, each scores everything, and only rank 0 writes."
        ),
    )
    parser.add_argument("run_dir", nargs="?", type=Path, metavar="RUN_DIR")
    rest, overrides = split_args(argv)
    args = parser.parse_args(rest)
    with one_line_errors("verify-report"):
        from selfimprove.config import ConfigError

        out = pop_option(overrides, "out")
        if not out:
            raise ConfigError("out: missing value (set it: out=DIR, a folder for the report)")
        if Path(out).exists() and not Path(out).is_dir():
            raise ConfigError(f"out: {out} is a file; give a folder")
        requested = pop_option(overrides, "verifiers")
        options = session_options(overrides, prompts="100")
        report = run(
            args.run_dir, overrides, out=Path(out), requested=requested, command=_command(argv), **options
        )
    n_scorers, n_samples = len(report["scorers"]), report["n_samples"]
    print(f"[selfimprove] verify-report: {n_scorers} verifiers on {n_samples} samples -> {out}")
