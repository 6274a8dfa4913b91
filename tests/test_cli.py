"""The command line: user recipe folders, sweeps, eval on another task, one-line config errors, and
the configs inside the wheel. Most tests compose in-process or stop at `--cfg job`; none trains."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import run_cli
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from selfimprove.cli import _recipe_searchpath, _sweep_dirname
from selfimprove.compose import compose_config, describe, eval_config
from selfimprove.config import ConfigError, register

register()
CONFIG_ERRORS = (ConfigError, HydraException, OmegaConfBaseException)
REPO = Path(__file__).parents[1]
MINE = """# @package _global_
defaults:
  - oracle_sft
  - _self_

recipe: mine
loop: {rounds: 1}
sampler: {n: 3}
"""


def saved_run(*overrides: str) -> DictConfig:
    """A config as a run folder saves it (resolved), without training."""
    cfg = compose_config(["recipe=sharpen_sft", "model=tiny", *overrides])
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


def error_line(proc) -> str:
    """A config mistake ends in exactly one stderr line, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: "), proc.stderr[-3000:]
    return lines[0]


# --- --recipes DIR -----------------------------------------------------------------------------------


def test_user_recipe_folder_extends_a_shipped_recipe(tmp_path):
    (tmp_path / "mine.yaml").write_text(MINE)
    proc = run_cli(["train", "--recipes", str(tmp_path), "recipe=mine", "model=tiny", "--cfg", "job"])
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.recipe == "mine" and cfg.loop.rounds == 1 and cfg.sampler.n == 3  # its own numbers
    assert cfg.selector._target_.endswith("GroundTruthFilter")  # the rest from oracle_sft
    assert "correct" in cfg.verifiers and cfg.model.kind == "tiny"


def test_user_recipe_folder_also_as_recipes_equals(tmp_path):
    (tmp_path / "mine.yaml").write_text(MINE)
    proc = run_cli(["train", f"--recipes={tmp_path}", "--cfg", "job", "recipe=mine", "model=tiny"])
    assert "recipe: mine" in proc.stdout


def test_user_recipe_with_a_shipped_name_is_refused(tmp_path):
    (tmp_path / "oracle_sft.yaml").write_text(MINE)
    line = error_line(run_cli(["train", "--recipes", str(tmp_path), "recipe=oracle_sft"], check=False))
    assert "oracle_sft.yaml" in line and "rename" in line


def test_a_config_error_leaves_no_run_folder(tmp_path):
    run_dir = tmp_path / "r"
    args = ["train", "recipe=sharpen_sft", "selector.per_prompt=lots", f"run.dir={run_dir}"]
    line = error_line(run_cli(args, check=False))
    assert "selector.per_prompt" in line and not run_dir.exists()


def test_unknown_recipe_hints_at_recipes_flag(tmp_path):
    line = error_line(run_cli(["train", "recipe=mine", f"run.dir={tmp_path}/r"], check=False))
    assert "recipe=mine" in line and "oracle_sft" in line and "--recipes" in line
    line = error_line(run_cli(["train", "--recipes", str(tmp_path / "nope"), "recipe=mine"], check=False))
    assert "--recipes" in line and "nope" in line


def test_help_documents_recipes_sweeps_and_eval():
    top = run_cli(["--help"]).stdout
    assert "--recipes DIR" in top and "-m seed=" in top and "task=jsonl" in top and "oracle_sft" in top
    train = run_cli(["train", "--help"]).stdout
    shipped = sorted(p.stem for p in (Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert "--recipes DIR" in train and "recipe: " + ", ".join(shipped) in train


# --- sweeps ------------------------------------------------------------------------------------------


def test_sweep_folder_is_named_by_the_swept_keys():
    (extra,) = _sweep_dirname(["-m", "seed=1,2", "model=tiny", "+x@y.z=1", "hydra.verbose=true"])
    assert extra == "hydra.job.config.override_dirname.exclude_keys=['run.dir','resume','model','x']"
    assert _sweep_dirname(["seed=1"]) == []  # not a sweep


def test_sweep_gives_each_job_its_own_run_folder(tmp_path):
    run_dir = tmp_path / "sweep"
    cheap = ["recipe=oracle_sft", "model=tiny", "loop.rounds=0", "eval.before=false"]
    run_cli(["train", "-m", "seed=1,2", *cheap, f"run.dir={run_dir}"])
    for seed in (1, 2):
        saved = OmegaConf.load(run_dir / f"seed={seed}" / "config.yaml")
        assert saved.seed == seed and Path(saved.run.dir) == run_dir / f"seed={seed}"
    assert sorted(p.name for p in run_dir.iterdir()) == ["multirun.yaml", "seed=1", "seed=2"]


def test_a_failing_job_of_a_sweep_says_so_when_it_fails(tmp_path):
    """Hydra keeps a job's exception until every job has run; the job prints it when it happens."""
    run_dir = tmp_path / "sweep"
    cheap = ["recipe=oracle_sft", "model=tiny", "loop.rounds=1", "eval.before=false", "eval.n_problems=2"]
    # 10**6 new tokens exceed the tiny model's context: the second job fails while sampling round 1
    proc = run_cli(
        ["train", "-m", "sampler.max_new_tokens=2,1000000", *cheap, f"run.dir={run_dir}"], check=False
    )
    assert proc.returncode != 0
    failed = proc.stderr.index(f"[selfimprove] {run_dir}/sampler.max_new_tokens=1000000 failed:")
    assert "exceeds the model's context" in proc.stderr[failed:]
    assert (run_dir / "sampler.max_new_tokens=2" / "metrics.jsonl").exists()  # the first job ran whole


# --- eval on another task ----------------------------------------------------------------------------


def test_eval_switches_task_and_keeps_the_runs_model_and_adapter():
    saved = saved_run("trainer.lora_r=4", "ema.enabled=true", "ema.evaluate=[raw,ema]")
    cfg = eval_config(saved, ["task=jsonl", "task.path=/data/p.jsonl", "eval.n_problems=5"])
    fresh = compose_config(["recipe=sharpen_sft", "task=jsonl", "task.path=/data/p.jsonl"])
    assert cfg.task == fresh.task and "level" not in cfg.task  # the new group whole, nothing of the old
    assert cfg.trainer.lora_r == 4 and cfg.ema.evaluate == ["raw", "ema"] and cfg.model.kind == "tiny"
    assert cfg.eval.n_problems == 5 and cfg.selector == saved.selector and cfg.recipe == "sharpen_sft"


def test_eval_sets_a_key_of_the_runs_own_task():
    saved = saved_run("task=jsonl", "task.path=/data/train.jsonl")
    cfg = eval_config(saved, ["task.path=/data/other.jsonl"])
    assert cfg.task.path == "/data/other.jsonl" and cfg.task._target_.endswith("JsonlTask")


def test_eval_adds_a_verifier_and_keeps_the_runs_others():
    saved = saved_run("+verifier@verifiers.extra=majority")
    cfg = eval_config(saved, ["+verifier@verifiers.sc2=self_certainty"])
    assert set(cfg.verifiers) == set(saved.verifiers) | {"sc2"}


def test_eval_of_a_recipe_not_on_the_path_needs_it_only_to_switch_groups():
    saved = saved_run()
    saved.recipe = "mine"
    assert eval_config(saved, ["eval.k=0"]).eval.k == 0
    with pytest.raises(CONFIG_ERRORS) as e:
        eval_config(saved, ["task=jsonl"])
    assert "recipe=mine" in describe(e.value) and "--recipes" in describe(e.value)


def test_eval_of_a_user_recipe_run_switches_groups_with_recipes_flag(tmp_path):
    (tmp_path / "mine.yaml").write_text(MINE)
    with _recipe_searchpath(tmp_path) as searchpath:
        saved = OmegaConf.create(
            OmegaConf.to_container(compose_config([*searchpath, "recipe=mine", "model=tiny"]), resolve=True)
        )
        cfg = eval_config(saved, [*searchpath, "task=jsonl", "task.path=/p.jsonl"])
    assert cfg.recipe == "mine" and cfg.sampler.n == 3 and cfg.task.path == "/p.jsonl"


@pytest.mark.parametrize(
    "override, named",
    [
        ("trainer.lrr=1", "trainer.lrr: no such key in trainer"),
        ("task.path=x", "task.path: no such key in task"),
        ("model.hidden_size=big", "model.hidden_size: Value 'big'"),
        ("model=nosuch", "model=nosuch: no such option (available: hf, smollm2_135m, tiny)"),
        ("recipe=oracle_sft", "recipe: a run folder keeps its recipe"),
    ],
)
def test_eval_config_mistakes_name_the_key(override, named):
    with pytest.raises(CONFIG_ERRORS) as e:
        eval_config(saved_run(), [override])
    assert describe(e.value).startswith(named)


# --- one-line config errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, named",
    [
        ("model=nosuch", "model=nosuch: no such option (available: hf, smollm2_135m, tiny)"),
        ("trainer.lrr=1", "trainer.lrr: no such key in trainer (keys: lora,"),
        ("loop.rounds=many", "loop.rounds: Value 'many'"),
        ("model=hf", "model.path"),
        ("task=jsonl", "task.path: missing value"),
    ],
)
def test_train_config_mistake_is_one_line(tmp_path, override, named):
    line = error_line(run_cli(["train", override, f"run.dir={tmp_path}/r"], check=False))
    assert line.startswith(f"config error: {named}")
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_unparsable_override_names_itself():
    with pytest.raises(CONFIG_ERRORS) as e:
        compose_config(["trainer=["])
    assert describe(e.value).startswith("trainer=[: ")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("evalrun")
    OmegaConf.save(saved_run(), folder / "config.yaml")
    return folder


@pytest.mark.parametrize(
    "args, named",
    [
        (["model=nosuch"], "model=nosuch: no such option"),
        (["task=jsonl"], "task.path: missing value"),
    ],
)
def test_eval_config_mistake_is_one_line(run_folder, args, named):
    line = error_line(run_cli(["eval", str(run_folder), *args], check=False))
    assert line.startswith(f"config error: {named}")


def test_eval_without_a_run_folder_and_a_bad_folder(tmp_path):
    assert "model.path" in error_line(run_cli(["eval", "model=hf"], check=False))
    line = error_line(run_cli(["eval", str(tmp_path), "eval.k=0"], check=False))
    assert str(tmp_path) in line and "not a run folder" in line


# --- the wheel ---------------------------------------------------------------------------------------


def test_wheel_carries_configs_and_recipes(tmp_path):
    pytest.importorskip("setuptools")
    # Build from a copy: pip builds in the source tree, and others work in this one.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("selfimprove", "configs", "recipes"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src)]
    subprocess.run([*pip, "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("selfimprove-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "selfimprove/_configs/config.yaml" in names
    assert "selfimprove/_configs/recipe/quickstart.yaml" in names
    assert "selfimprove/_configs/model/tiny.yaml" in names
    assert len(names) == len(set(names))  # configs/recipe (a link to recipes/) is not packed twice
    # pyproject lists the packages by hand (the configs are mapped in): none may be left out
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "selfimprove").rglob("*.py")}
    assert modules <= set(names), sorted(modules - set(names))

    # The unpacked wheel, ahead of this checkout on the path, composes from its own configs.
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = (
        "import sys; from selfimprove import cli; print(cli.CONFIG_DIR); "
        "sys.argv = ['selfimprove', 'train', 'recipe=oracle_sft', 'model=tiny', '--cfg', 'job']; cli.main()"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(str(tmp_path / "site" / "selfimprove" / "_configs"))
    assert "GroundTruthFilter" in proc.stdout and "kind: tiny" in proc.stdout


# --- stdout is data ----------------------------------------------------------------------------------


def test_eval_stdout_is_the_json_alone(baseline_run, tmp_path):
    """`selfimprove eval RUN > result.json` gives JSON: logs (ours, DeepSpeed's notice) go to stderr;
    `sample` and `export` write nothing but their files."""
    import json

    proc = run_cli(["eval", str(baseline_run), "eval.n_problems=4", "eval.k=1", "eval.k_problems=2"])
    result = json.loads(proc.stdout)
    assert "eval/accuracy" in result and result["checkpoint"]
    assert "[selfimprove] loaded" in proc.stderr
    out = tmp_path / "s.jsonl"
    proc = run_cli(["sample", str(baseline_run), "sampler.n=2", "prompts=2", f"out={out}"])
    assert proc.stdout == "" and "[selfimprove] wrote" in proc.stderr and out.exists()
    proc = run_cli(["export", str(baseline_run), str(tmp_path / "export")])
    assert proc.stdout == "" and "[selfimprove] exported" in proc.stderr
