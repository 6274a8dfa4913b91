"""`selfimprove train|eval [--recipes DIR] [key=value ...]`: one entry point, Hydra underneath.

`train` is a Hydra app, so `--help`, `--cfg job`, `-m` sweeps and `key=value` overrides all work; `eval`
takes a run folder (its saved config and latest checkpoint) or a model config, plus overrides. Config
mistakes end in one line, `config error: <key>: <why>`, before any model loads.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from selfimprove.compose import CONFIG_DIR, CommandError, check, describe, load_config, split_args
from selfimprove.config import ConfigError, register

USAGE = """usage: selfimprove {{train,eval,sample,verify-report,export,report,rounds}} [--recipes DIR] [key=value ...]

  train   run (or resume) a recipe:   selfimprove train recipe=oracle_sft model=tiny loop.rounds=2
          selfimprove train --help    config groups and options
          selfimprove train --cfg job show the resolved config without running
          selfimprove train -m seed=1,2,3 recipe=oracle_sft
                                      a sweep: one run folder per job, <run.dir>/seed=1 ...
  eval    evaluate a run folder's latest weights (raw and EMA), or a model:
          selfimprove eval runs/quickstart eval.n_problems=300
          selfimprove eval runs/quickstart task=jsonl task.path=problems.jsonl
                                      another task: switched groups are taken whole,
                                      everything else (model, LoRA, EMA) from the run
          selfimprove eval model=smollm2_135m
  sample  write samples with log-probs, self-certainty and every scorer's score, to look at:
          selfimprove sample runs/quickstart sampler.n=8 prompts=16 out=samples.parquet
          selfimprove sample model=smollm2_135m recipe=sharpen_sft out=samples.jsonl
  verify-report  which verifier picks the right answer among N: AUROC (pooled, within prompts),
          best-of-N vs random / majority / pass@N, calibration of P(True), cost; json, md, plots:
          selfimprove verify-report runs/quickstart sampler.n=8 prompts=100 out=report/
          selfimprove verify-report model=smollm2_135m sampler.n=8 verifiers=self_certainty,ptrue out=report/
  report  one HTML page (plots embedded) and a JSON of one run or many: accuracy over rounds, the
          mean and min-max band across seeds, each run's start / peak / final / reported accuracy:
          selfimprove report runs/seeds out=report.html       (a sweep folder, or RUN_DIR ...)
  rounds  every round's samples as trl's prompt/completion records (JSON lines), scores beside:
          selfimprove rounds runs/quickstart out=rounds.jsonl
  export  a folder transformers (or peft, for an unmerged LoRA adapter) loads:
          selfimprove export runs/quickstart OUT_DIR [--weights raw|ema] [--merge] [--force]

  --recipes DIR  your own recipes: DIR/mine.yaml starts with `# @package _global_`, is written like
                 the shipped ones and may extend one (`defaults: [oracle_sft, _self_]`); run it with
                 selfimprove train --recipes DIR recipe=mine  (eval a run of it the same way)

recipes: {recipes}
"""

_CONFIG_ERRORS = (HydraException, OmegaConfBaseException, ConfigError)
_in_job = False  # True while a run executes: a Hydra or OmegaConf error there is a bug, not a config slip


def _recipes() -> str:
    return ", ".join(sorted(p.stem for p in (Path(CONFIG_DIR) / "recipe").glob("*.yaml")))


# --- train ------------------------------------------------------------------------------------------


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def _train_app(cfg: DictConfig) -> None:
    global _in_job
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    cfg.recipe = hc.runtime.choices.get("recipe", cfg.recipe)
    if hc.mode == RunMode.MULTIRUN:  # each job its own folder; hydra.sweep.dir is ${run.dir}
        cfg.run.dir = str(Path(cfg.run.dir) / hc.sweep.subdir)
    # Exit here rather than raise: Hydra adds a line of its own to errors raised by a job.
    try:
        plan = check(cfg)  # the parts built for the check are the ones the run uses
    except _CONFIG_ERRORS as e:
        _fail(e)
    from selfimprove.loop import run

    _in_job = True  # left set if the run raises, so main() shows that error in full
    from selfimprove.checkpoint import CheckpointError

    try:
        run(cfg, plan)
    except ConfigError as e:  # found by the run itself, e.g. a resume that would change the experiment
        _fail(e)
    except CheckpointError as e:
        sys.exit(f"checkpoint error: {e}")
    except Exception:
        if hc.mode == RunMode.MULTIRUN:  # Hydra holds a job's error until the whole sweep ends: say it now
            print(
                f"[selfimprove] {cfg.run.dir} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True
            )
        raise
    _in_job = False


def _sweep_dirname(args: list[str]) -> list[str]:
    """For `-m`: name each job's folder by the swept keys only (`seed=2`), so names stay short and a
    sweep resumed with other fixed overrides (resume=auto loop.rounds=20) finds its folders again."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = get_args_parser().parse_known_args(args)[0]
    if not parsed.multirun or any(a.startswith("hydra.job.config.override_dirname") for a in args):
        return []
    fixed = [
        o.key_or_group
        for o in OverridesParser.create().parse_overrides(parsed.overrides)
        if not o.is_sweep_override() and not o.key_or_group.startswith("hydra.")
    ]
    quoted = ",".join(repr(k) for k in ["run.dir", "resume", *fixed])
    return [f"hydra.job.config.override_dirname.exclude_keys=[{quoted}]"]


def _with_overrides(args: list[str], extra: list[str]) -> list[str]:
    """Adds overrides next to the user's: argparse takes a single run of them among the flags."""
    at = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), 0)
    return [*args[:at], *extra, *args[at:]]


def train(args: list[str]) -> None:
    sys.argv = ["selfimprove train", *_with_overrides(args, _sweep_dirname(args))]
    _train_app()


# --- eval -------------------------------------------------------------------------------------------


def evaluate(args: list[str]) -> None:
    from selfimprove.evaluate import evaluate_run

    paths, overrides = split_args(args)
    run_dir = Path(paths[0]) if paths else None
    try:
        cfg = load_config(run_dir, overrides)
    except CommandError as e:
        raise ConfigError(str(e)) from None
    global _in_job
    _in_job = True
    from selfimprove.logging import stdout_to_stderr

    with stdout_to_stderr():  # stdout is the JSON alone: `selfimprove eval RUN > result.json`
        result = evaluate_run(cfg, run_dir)
    print(json.dumps(result, indent=1))


# --- the entry point --------------------------------------------------------------------------------


# One function per subcommand, each taking its arguments after --recipes is handled; `sample`,
# `verify-report` and `export` join here.
def export(args: list[str]) -> None:
    from selfimprove.export import main as export_main

    export_main(args)


def sample(args: list[str]) -> None:
    from selfimprove.sample import main as sample_main

    sample_main(args)


def rounds(args: list[str]) -> None:
    from selfimprove.trl_rewards import main as rounds_main

    rounds_main(args)


def report(args: list[str]) -> None:
    from selfimprove.report import main as report_main

    report_main(args)


def verify_report(args: list[str]) -> None:
    from selfimprove.verify_report import main as report_main

    report_main(args)


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "train": train,
    "eval": evaluate,
    "sample": sample,
    "verify-report": verify_report,
    "export": export,
    "report": report,
    "rounds": rounds,
}


def _pop_recipes(args: list[str]) -> tuple[list[str], Path | None]:
    """Takes `--recipes DIR` (or `--recipes=DIR`) out of the arguments."""
    for i, arg in enumerate(args):
        if arg == "--recipes":
            if i + 1 >= len(args):
                raise ConfigError("--recipes: needs a folder (--recipes DIR)")
            return args[:i] + args[i + 2 :], Path(args[i + 1])
        if arg.startswith("--recipes="):
            return args[:i] + args[i + 1 :], Path(arg.split("=", 1)[1])
    return args, None


@contextmanager
def _recipe_searchpath(folder: Path | None) -> Iterator[list[str]]:
    """Hydra overrides that add a user's recipe folder as the `recipe` group: Hydra's search path takes
    config roots, so a temporary root holds a `recipe` link to the folder."""
    if folder is None:
        yield []
        return
    if not folder.is_dir():
        raise ConfigError(f"--recipes: {folder} is not a folder")
    shipped = {p.name for p in (Path(CONFIG_DIR) / "recipe").glob("*.yaml")}
    clash = sorted(shipped & {p.name for p in folder.glob("*.yaml")})
    if clash:  # the shipped one would win silently (the package's configs come first on the path)
        raise ConfigError(f"--recipes: {folder / clash[0]} has a shipped recipe's name; rename it")
    with tempfile.TemporaryDirectory(prefix="selfimprove-recipes-") as root:
        try:
            (Path(root) / "recipe").symlink_to(folder.resolve(), target_is_directory=True)
        except OSError:  # no symlinks (Windows without developer mode): a copy does the same
            import shutil

            shutil.copytree(folder, Path(root) / "recipe")
        yield [f"hydra.searchpath=['{Path(root).as_uri()}']"]


@contextmanager
def _hydra_raises() -> Iterator[None]:
    """Hydra prints composition errors over many lines and exits; this makes it raise them to us."""
    old = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["HYDRA_FULL_ERROR"]
        else:
            os.environ["HYDRA_FULL_ERROR"] = old


def main() -> None:
    register()
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(recipes=_recipes()))
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.exit(f"unknown command {command!r}\n\n" + USAGE.format(recipes=_recipes()))
    full_errors = os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        rest, recipes = _pop_recipes(rest)
        with _recipe_searchpath(recipes) as searchpath, _hydra_raises():
            COMMANDS[command](_with_overrides(rest, searchpath))
    except _CONFIG_ERRORS as e:
        if _in_job and not isinstance(e, ConfigError) or full_errors and not isinstance(e, ConfigError):
            raise
        _fail(e)


def _fail(error: BaseException) -> None:
    print(f"config error: {describe(error)}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
