"""`selfimprove sample [RUN_DIR] [key=value ...] out=FILE [prompts=16] [split=eval|train] [weights=raw|ema]`.

Samples `sampler.n` completions for each of `prompts` problems and writes them as a table, one row a
sample, with everything the loop's rows hold: the prompt, the completion and its token ids, per-token
log-probs, self-certainty and entropy, the answer, the reward, and a `score/<name>` column for every
configured verifier. The weights are a run's newest checkpoint (its saved config, plus overrides) or
a bare model (`model=...`, composed like `train`). `out` ends in .parquet or .jsonl.

`open_session` and `Session.draw` are shared with `selfimprove verify-report`, which samples the same way
(the same seeds: the same samples) and then scores with each verifier config in turn.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from selfimprove.compose import CommandError, load_config, one_line_errors, pop_option, split_args

if TYPE_CHECKING:
    from selfimprove.stages import Context

FORMATS = (".parquet", ".jsonl")
# Read first in a table: what was asked and what came back; the rest follows in the loop's order.
FIRST = ["prompt_id", "sample_idx", "split", "prompt", "completion", "answer", "target", "reward", "correct"]


def session_options(overrides: list[str], prompts: str = "16") -> dict:
    """prompts=, split= and weights=, taken out of the config overrides and checked (shared with
    `verify-report`)."""
    from selfimprove.config import ConfigError

    prompts = pop_option(overrides, "prompts", prompts)
    split = pop_option(overrides, "split", "eval")
    weights = pop_option(overrides, "weights", "raw")
    if not prompts.isdigit() or int(prompts) < 1:
        raise ConfigError(f"prompts: {prompts!r} is not a positive number of problems")
    if split not in ("eval", "train"):
        raise ConfigError(f"split: {split!r} is not eval|train")
    if weights not in ("raw", "ema"):
        raise ConfigError(f"weights: {weights!r} is not raw|ema")
    return dict(n_prompts=int(prompts), split=split, weights=weights)


def _options(overrides: list[str]) -> dict:
    """The command's own key=value options, taken out of the config overrides and checked."""
    from selfimprove.config import ConfigError

    out = pop_option(overrides, "out")
    if not out:
        raise ConfigError("out: missing value (set it: out=samples.parquet or out=samples.jsonl)")
    if Path(out).suffix not in FORMATS:
        raise ConfigError(f"out: {out} must end in .parquet or .jsonl")
    return dict(out=Path(out), **session_options(overrides))


@dataclass
class Session:
    """A config, its task's problems and an engine holding the weights to sample: what `sample` and
    `verify-report` share, so both draw the same samples from the same seeds."""

    cfg: DictConfig
    task: Any
    problems: list
    scorers: list
    engine: Any
    split: str
    seed: int
    weights: str = "policy"  # what the rows are sampled from, in the engine's names (policy | ema)

    def unit_sizes(self) -> list[int]:
        """Rows in each unit, in order (all samples of a prompt share a unit): the split of
        `phases.sample_units`, so a scorer run per unit sees what `verify_units` would give it."""
        from selfimprove import phases

        n, batch_size = self.cfg.sampler.n, self.cfg.sampler.batch_size
        return [len(r) * n for r in phases.units(len(self.problems), n, batch_size)]

    def draw(self, folder: Path) -> list[dict]:
        """`sampler.n` completions per problem, unit by unit into `folder` (the loop's own code)."""
        from selfimprove import phases
        from selfimprove.rollout import OneTurn

        cfg = self.cfg
        return phases.sample_units(
            folder,
            self.problems,
            OneTurn(),
            cfg.sampler.n,
            {**phases.generation_options(cfg.sampler), "weights": self.weights},
            context_of_unit=self.context,
            should_stop=lambda: False,
            desc="sample",
        )

    def context(self, unit: int, *parts: object) -> Context:
        """The context for one unit (sampling; "verify": the scorers'), seeded from the session's seed."""
        from selfimprove import distributed as dist
        from selfimprove.stages import Context

        seed = dist.derive_seed(self.seed, *parts, unit)
        return Context(self.engine, self.task, seed, self.cfg.sampler.batch_size)

    def finish(self, rows: list[dict]) -> list[dict]:
        """The prompt as the model saw it (template and prefill) and the split added; FIRST first."""
        for row in rows:
            row.update(split=self.split, prompt=self.engine.tokenizer.decode(row["prompt_ids"]))
        return [{**{k: r[k] for k in FIRST}, **r} for r in rows]


def open_session(
    run_dir: Path | None,
    overrides: list[str],
    *,
    n_prompts: int,
    split: str,
    weights: str,
    scorers: Callable[[DictConfig, Any], list] | None = None,
) -> Session:
    """Config, problems and scorers (`scorers(cfg, task)`, by default the config's verifiers) are
    checked before the model loads; then the engine, with a run's newest checkpoint restored."""
    from hydra.utils import instantiate

    from selfimprove import distributed as dist
    from selfimprove.config import ConfigError, build_stages
    from selfimprove.ema import engine_weights
    from selfimprove.engine import Engine
    from selfimprove.stages import order_stages

    cfg = load_config(run_dir, overrides)
    backtrack = cfg.sampler.backtrack
    if backtrack.quota > 0 and backtrack.verifier == "probe":  # else it would sample plainly, silently
        raise ConfigError(
            "sampler.backtrack.verifier=probe needs a probe fitted on a training round's samples, which "
            "only the training loop has: use sampler.backtrack.verifier=task (the task's prefix check) "
            "or sampler.backtrack.quota=0"
        )
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
    if scorers is None:
        nodes = {f"verifiers.{k}": v for k, v in cfg.verifiers.items()}
        stages = order_stages(list(build_stages(nodes, task).values()))
    else:
        stages = scorers(cfg, task)
    engine = Engine(cfg, train=False, reference=any(s.needs_reference for s in stages))
    if run_dir is not None:
        engine.restore(run_dir, weights)
    seed = dist.derive_seed(cfg.seed, "sample-command", split)
    return Session(cfg, task, problems, stages, engine, split, seed, engine_weights(weights))


def sample(
    run_dir: Path | None, overrides: list[str], *, n_prompts: int, split: str, weights: str
) -> list[dict]:
    """Sampled and scored rows for the first n_prompts held-out (split=eval) or training problems."""
    from selfimprove import phases

    session = open_session(run_dir, overrides, n_prompts=n_prompts, split=split, weights=weights)
    # Units in a throwaway folder (one process): the loop's own sample and verify code; seeds from `seed`.
    with tempfile.TemporaryDirectory(prefix="selfimprove-sample-") as tmp:
        session.draw(Path(tmp) / "samples")
        rows, _ = phases.verify_units(  # what scorers log is for a round's record: not a table's
            Path(tmp) / "samples",
            Path(tmp) / "scored",
            scorers=session.scorers,
            context_of_unit=lambda u: session.context(u, "verify"),
            should_stop=lambda: False,
        )
    return session.finish(rows)


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
    from selfimprove.logging import log, stdout_to_stderr

    with one_line_errors("sample"), stdout_to_stderr():
        options = _options(overrides)
        out = options.pop("out")
        rows = sample(args.run_dir, overrides, **options)
        from selfimprove import distributed as dist

        if dist.is_main():
            write_rows(out, rows)
    log(f"wrote {len(rows)} samples to {out}")
