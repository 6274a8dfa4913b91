"""`selfimprove sample [RUN_DIR] [key=value ...] out=FILE [prompts=16] [split=eval|train] [weights=raw|ema]`.

Samples `sampler.n` completions for each of `prompts` problems and writes them as a table, one row a
sample, with everything the loop's rows hold: the prompt, the completion and its token ids, per-token
log-probs, self-certainty and entropy, the answer, the reward, and a `score/<name>` column for every
configured verifier. The weights are a run's newest checkpoint (its saved config, plus overrides) or
a bare model (`model=...`, composed like `train`). `out` ends in .parquet or .jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

from selfimprove.compose import CommandError, load_config, one_line_errors, pop_option, restore, split_args

FORMATS = (".parquet", ".jsonl")
# Read first in a table: what was asked and what came back; the rest follows in the loop's order.
FIRST = ["prompt_id", "sample_idx", "split", "prompt", "completion", "answer", "target", "reward", "correct"]


def _options(overrides: list[str]) -> dict:
    """The command's own key=value options, taken out of the config overrides and checked."""
    from selfimprove.config import ConfigError

    out = pop_option(overrides, "out")
    prompts = pop_option(overrides, "prompts", "16")
    split = pop_option(overrides, "split", "eval")
    weights = pop_option(overrides, "weights", "raw")
    if not out:
        raise ConfigError("out: missing value (set it: out=samples.parquet or out=samples.jsonl)")
    if Path(out).suffix not in FORMATS:
        raise ConfigError(f"out: {out} must end in .parquet or .jsonl")
    if not prompts.isdigit() or int(prompts) < 1:
        raise ConfigError(f"prompts: {prompts!r} is not a positive number of problems")
    if split not in ("eval", "train"):
        raise ConfigError(f"split: {split!r} is not eval|train")
    if weights not in ("raw", "ema"):
        raise ConfigError(f"weights: {weights!r} is not raw|ema")
    return dict(out=Path(out), n_prompts=int(prompts), split=split, weights=weights)


def sample(
    run_dir: Path | None, overrides: list[str], *, n_prompts: int, split: str, weights: str
) -> list[dict]:
    """Sampled and scored rows for the first n_prompts held-out (split=eval) or training problems."""
    from hydra.utils import instantiate

    from selfimprove import distributed as dist
    from selfimprove import phases
    from selfimprove.config import ConfigError
    from selfimprove.engine import Engine

    cfg = load_config(run_dir, overrides)
    if weights == "ema" and (run_dir is None or not cfg.ema.enabled):
        raise CommandError(
            "weights=ema but " + ("a bare model has no EMA" if run_dir is None else "the run kept no EMA")
        )
    task = instantiate(cfg.task)
    try:
        problems = (
            task.eval_problems(n_prompts)
            if split == "eval"
            else [task.train_problem(i) for i in range(n_prompts)]
        )
    except ValueError as e:
        raise ConfigError(f"prompts={n_prompts}: {e}") from None
    scorers = [instantiate(v) for v in cfg.verifiers.values()]
    engine = Engine(
        cfg, train=False, reference=any(getattr(s, "needs_base_logprobs", False) for s in scorers)
    )
    if run_dir is not None:
        restore(engine, run_dir, weights, flag="weights=ema")

    n, batch_size = cfg.sampler.n, cfg.sampler.batch_size
    common = dict(engine=engine, batch_size=batch_size, timer={}, should_stop=lambda: False)
    # Units in a throwaway folder (one process): the loop's own sample and verify code; seeds from `seed`.
    with tempfile.TemporaryDirectory(prefix="selfimprove-sample-") as tmp, engine.weights(weights):
        phases.sample_units(
            Path(tmp) / "samples",
            problems,
            task=task,
            n=n,
            gen=dict(
                max_new_tokens=cfg.sampler.max_new_tokens,
                temperature=cfg.sampler.temperature,
                top_p=cfg.sampler.top_p,
            ),
            seed_of_unit=lambda u: dist.derive_seed(cfg.seed, "sample-command", split, u),
            desc="sample",
            **common,
        )
        units = phases.n_units(len(problems), n, batch_size)
        rows = phases.verify_units(
            Path(tmp) / "samples", Path(tmp) / "scored", units, scorers=scorers, **common
        )
    by_id = {p.id: p for p in problems}
    for row in rows:
        problem = by_id[row["prompt_id"]]
        row.update(
            split=split,
            prompt=engine.tokenizer.decode(row["prompt_ids"]),  # as the model saw it: template and prefill
            messages=problem.messages,
            prefill=problem.prefill,
        )
    return [{**{k: r[k] for k in FIRST}, **r} for r in rows]


def _finite(value):
    """JSON has no NaN or infinity (a -inf score marks an empty completion): they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_rows(path: Path, rows: list[dict]) -> None:
    """Parquet or JSON lines by the extension, written to a temporary file and renamed into place."""
    from selfimprove.checkpoint import write_table

    if path.suffix == ".parquet":
        write_table(path, rows)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps({k: _finite(v) for k, v in row.items()}, allow_nan=False) + "\n")
    os.replace(tmp, path)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="selfimprove sample",
        description="Sample and score completions: a run's newest checkpoint, or a model, into a table.",
        epilog=(
            "options (key=value): out=FILE (.parquet|.jsonl, required), prompts=16, split=eval|train, "
            "weights=raw|ema; any other key=value overrides the config, e.g. sampler.n=8 task=jsonl "
            "task.path=problems.jsonl. Without RUN_DIR the config is composed as for train: model=... recipe=..."
        ),
    )
    parser.add_argument("run_dir", nargs="?", type=Path, metavar="RUN_DIR")
    rest, overrides = split_args(argv)
    args = parser.parse_args(rest)
    with one_line_errors("sample"):
        options = _options(overrides)
        out = options.pop("out")
        rows = sample(args.run_dir, overrides, **options)
        from selfimprove import distributed as dist

        if dist.is_main():
            write_rows(out, rows)
    print(f"[selfimprove] wrote {len(rows)} samples to {out}")
