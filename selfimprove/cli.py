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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from selfimprove.config import ConfigError, register, validate_targets


def _config_dir() -> str:
    """configs/ at the top of the repository (a source checkout), or its copy inside the wheel."""
    packaged = Path(__file__).parent / "_configs"
    return str(packaged if packaged.is_dir() else Path(__file__).parents[1] / "configs")


CONFIG_DIR = _config_dir()
USAGE = """usage: selfimprove {{train,eval,sample,export}} [--recipes DIR] [key=value ...]

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


def _check(cfg: DictConfig) -> None:
    """Everything that can be checked before a model loads; raises ConfigError naming the key."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: missing value (set it: {missing[0]}=...)")
    validate_targets(cfg)


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
        _check(cfg)
    except _CONFIG_ERRORS as e:
        _fail(e)
    from selfimprove.loop import run

    _in_job = True  # left set if the run raises, so main() shows that error in full
    from selfimprove.checkpoint import CheckpointError

    try:
        run(cfg)
    except ConfigError as e:  # found by the run itself, e.g. a resume that would change the experiment
        _fail(e)
    except CheckpointError as e:
        sys.exit(f"checkpoint error: {e}")
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


def compose_config(overrides: list[str], config_dir: str = CONFIG_DIR) -> DictConfig:
    """The config `train` would run with these overrides (Hydra's compose API, no run)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return compose("config", overrides=overrides)


def eval_config(saved: DictConfig, overrides: list[str], config_dir: str = CONFIG_DIR) -> DictConfig:
    """The config to evaluate a trained run with: its saved config plus the user's overrides.

    A switched group (task=jsonl) is composed fresh with the run's recipe and taken whole; everything
    else (model, trainer/LoRA, ema, numbers) comes from the run; dotted overrides apply last, with
    Hydra's own rules and messages (`+key=` to add, typed groups reject unknown keys).
    """
    from hydra import compose, initialize_config_dir
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()

        def is_group(o) -> bool:
            return o.package is not None or bool(loader.get_group_options(o.key_or_group))

        hydra_args = [o.input_line for o in parsed if o.key_or_group.startswith("hydra.")]
        groups = [o for o in parsed if not o.key_or_group.startswith("hydra.") and is_group(o)]
        keys = [o for o in parsed if not o.key_or_group.startswith("hydra.") and not is_group(o)]
        if any(o.key_or_group == "recipe" for o in groups):
            raise ConfigError("recipe: a run folder keeps its recipe; switch groups or set keys instead")
        # The recipe only matters for switched groups; without any, a run of a recipe that is not on
        # the search path (a user's, no --recipes) still evaluates.
        recipe = f"recipe={saved.recipe}" if groups else "~recipe"
        cfg = compose("config", overrides=[recipe, *hydra_args, *(o.input_line for o in groups)])
    switched = {o.package or o.key_or_group.replace("/", ".") for o in groups}
    with open_dict(cfg):
        _graft(cfg, saved, switched)
    ConfigLoaderImpl._apply_overrides_to_config(keys, cfg)
    return cfg


def _graft(base: DictConfig, saved: DictConfig, switched: set[str], prefix: str = "") -> None:
    """Copy `saved` into `base` except at the switched paths, which keep `base`'s node."""
    typed = OmegaConf.get_type(base) not in (dict, None)
    for key in set(base) | set(saved):
        path = f"{prefix}{key}"
        if path in switched:
            continue
        if any(s.startswith(path + ".") for s in switched):
            if key not in base:
                base[key] = {}
            _graft(base[key], saved.get(key, OmegaConf.create()), switched, path + ".")
        elif key not in saved:
            if not typed:  # an untyped node is the run's, whole; a schema field keeps its default
                del base[key]
        elif OmegaConf.is_dict(base.get(key)) and OmegaConf.get_type(base[key]) not in (dict, None):
            base[key].merge_with(saved[key])  # a typed node (model, trainer): checked against its schema
        else:
            base[key] = saved[key]


def evaluate(args: list[str]) -> None:
    from selfimprove.evaluate import evaluate_run

    run_dir = None
    if args and "=" not in args[0] and not args[0].startswith("~"):
        run_dir, args = Path(args[0]), args[1:]
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir}: not a run folder (no config.yaml)")
    if run_dir is not None:
        cfg = eval_config(OmegaConf.load(run_dir / "config.yaml"), args)
    else:
        cfg = compose_config(args)
    _check(cfg)
    global _in_job
    _in_job = True
    print(json.dumps(evaluate_run(cfg, run_dir), indent=1))


# --- the entry point --------------------------------------------------------------------------------


# One function per subcommand, each taking its arguments after --recipes is handled; `sample` and
# `export` join here.
def export(args: list[str]) -> None:
    from selfimprove.export import main as export_main

    export_main(args)


def sample(args: list[str]) -> None:
    from selfimprove.sample import main as sample_main

    sample_main(args)


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "train": train,
    "eval": evaluate,
    "sample": sample,
    "export": export,
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


def describe(error: BaseException) -> str:
    """A config error as one line that starts with the key or option at fault."""
    if isinstance(error, ConfigError):  # ours: already names the key (a resume diff keeps its lines)
        return str(error)
    if isinstance(error, OverrideParseException):
        return f"{error.override}: {error.message.splitlines()[0]}"
    if isinstance(error, MissingConfigException) and error.options is not None:
        group, _, name = (error.missing_cfg_file or "").rpartition("/")
        options = ", ".join(o for o in error.options if not o.endswith("_schema"))
        hint = " (a recipe of your own? add --recipes DIR)" if group == "recipe" else ""
        return f"{group}={name}: no such option (available: {options}){hint}"
    cause = error if isinstance(error, OmegaConfBaseException) else error.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        why = str(cause.msg).splitlines()[0]
        node = cause.parent_node
        if why.startswith("Key ") and OmegaConf.is_dict(node):  # unknown key: list the ones there are
            parent = cause.full_key.rpartition(".")[0] or "the config"
            why = f"no such key in {parent} (keys: {', '.join(str(k) for k in node)})"
        return f"{cause.full_key}: {why}"
    lines = [line.strip() for line in str(error).splitlines()]
    lines = lines[: lines.index("Config search path:")] if "Config search path:" in lines else lines
    return " ".join(line for line in lines if line and not line.startswith("Set the environment"))


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
