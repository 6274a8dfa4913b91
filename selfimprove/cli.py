"""`selfimprove train|eval [overrides]`: one entry point, Hydra underneath.

`train` is a Hydra app, so `--help`, `--cfg job` and `key=value` overrides all work; `eval` takes a
run folder (its config and latest checkpoint) or a model config, plus overrides.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from selfimprove.config import ConfigError, register, validate_targets

def _config_dir() -> str:
    """configs/ at the top of the repository (a source checkout), or its copy inside the wheel."""
    packaged = Path(__file__).parent / "_configs"
    return str(packaged if packaged.is_dir() else Path(__file__).parents[1] / "configs")


CONFIG_DIR = _config_dir()
USAGE = """usage: selfimprove {{train,eval}} [key=value ...]

  train   run (or resume) a recipe:   selfimprove train recipe=oracle_sft model=tiny loop.rounds=2
          selfimprove train --help    config groups and options
          selfimprove train --cfg job show the resolved config without running
  eval    evaluate a run folder's latest weights, or a model:
          selfimprove eval runs/quickstart [eval.n_problems=300]
          selfimprove eval model=smollm2_135m

recipes: {recipes}
"""


def _recipes() -> str:
    return ", ".join(sorted(p.stem for p in (Path(CONFIG_DIR) / "recipe").glob("*.yaml")))


def _check(cfg: DictConfig) -> None:
    try:
        validate_targets(cfg)
    except ConfigError as e:
        sys.exit(f"config error: {e}")


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def _train(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    cfg.recipe = HydraConfig.get().runtime.choices.get("recipe", cfg.recipe)
    _check(cfg)
    from selfimprove.loop import run

    try:
        run(cfg)
    except ConfigError as e:
        sys.exit(f"config error: {e}")


def _eval(args: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    from selfimprove.evaluate import evaluate_run

    run_dir = None
    if args and "=" not in args[0] and Path(args[0], "config.yaml").exists():
        run_dir, args = Path(args[0]), args[1:]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        if run_dir is not None:
            saved = OmegaConf.load(run_dir / "config.yaml")
            cfg = OmegaConf.merge(compose("config", overrides=[f"recipe={saved.recipe}"]), saved)
            cfg.merge_with_dotlist(args)
        else:
            cfg = compose("config", overrides=args)
    _check(cfg)
    print(json.dumps(evaluate_run(cfg, run_dir), indent=1))


def main() -> None:
    register()
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(recipes=_recipes()))
        return
    command, rest = argv[0], argv[1:]
    if command == "train":
        sys.argv = [f"{sys.argv[0]} train", *rest]
        _train()
    elif command == "eval":
        _eval(rest)
    else:
        sys.exit(f"unknown command {command!r}\n\n" + USAGE.format(recipes=_recipes()))


if __name__ == "__main__":
    main()
