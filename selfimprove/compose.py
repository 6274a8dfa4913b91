"""How a command gets its config: Hydra composition for a recipe, a run folder's saved config with
the user's overrides, the checks that run before any model loads, and one-line errors.

Shared by `train`, `eval`, `sample` and `export`, so a config mistake reads the same everywhere.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from selfimprove.config import ConfigError, register, validate_targets
from selfimprove.parts import Plan


def _config_dir() -> str:
    """configs/ at the top of the repository (a source checkout), or its copy inside the wheel."""
    packaged = Path(__file__).parent / "_configs"
    return str(packaged if packaged.is_dir() else Path(__file__).parents[1] / "configs")


CONFIG_DIR = _config_dir()


def check(cfg: DictConfig) -> Plan:
    """Everything that can be checked before a model loads; raises ConfigError naming the key. Returns
    the run's parts, built for the check, for the loop to run with."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: missing value (set it: {missing[0]}=...)")
    return validate_targets(cfg)


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


# An override is `key=value`, `+key=value`, `~key`...; the key never holds a "/" (a path with "=",
# like a sweep's `runs/x/seed=1`, is a path).
_OVERRIDE = re.compile(r"^[~+]{0,2}[\w.@-]+(=|$)")


class CommandError(Exception):
    """A user-facing failure of a command: printed as one line, no traceback."""


def is_override(arg: str) -> bool:
    if arg.startswith("-") or not _OVERRIDE.match(arg) or Path(arg).exists():
        return False
    return "=" in arg or arg.startswith("~")


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(everything else, key=value overrides), in their order."""
    rest = [a for a in argv if not is_override(a)]
    return rest, [a for a in argv if is_override(a)]


def pop_option(overrides: list[str], key: str, default: str | None = None) -> str | None:
    """Takes a command's own `key=value` (not a config key, e.g. out=FILE) out of the overrides."""
    value = default
    for arg in [a for a in overrides if a.startswith(key + "=")]:
        value = arg.split("=", 1)[1]
        overrides.remove(arg)
    return value


def load_config(run_dir: Path | None, overrides: list[str]) -> DictConfig:
    """A run folder's saved config with the overrides applied (as `selfimprove eval` does), or, with
    no run folder, the config `train` would compose from them. Checked before any model loads."""
    register()
    if run_dir is not None:
        if not (run_dir / "config.yaml").is_file():
            raise CommandError(f"{run_dir}: not a run folder (no config.yaml)")
        cfg = eval_config(OmegaConf.load(run_dir / "config.yaml"), overrides)
    else:
        cfg = compose_config(overrides)
    check(cfg)
    return cfg


@contextlib.contextmanager
def one_line_errors(command: str) -> Iterator[None]:
    """Known failures end the process with `<command>: <why>` on stderr: 2 for a config mistake,
    1 for anything else we expect (no checkpoint, an unreadable one, a refused folder)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from selfimprove.checkpoint import CheckpointError
    from selfimprove.config import ConfigError

    try:
        yield
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        print(f"{command}: {describe(e)}", file=sys.stderr)
        sys.exit(2)
    except (CommandError, CheckpointError) as e:
        print(f"{command}: {e}", file=sys.stderr)
        sys.exit(1)
