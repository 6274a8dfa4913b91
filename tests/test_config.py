"""Config errors are caught before any model loads and name the key; recipes compose."""

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
from conftest import TINY, cfg_of, run_cli
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class
from omegaconf.errors import ValidationError

from selfimprove.cli import CONFIG_DIR
from selfimprove.compose import describe
from selfimprove.config import (
    ConfigError,
    EvalConfig,
    TrainerConfig,
    VLLMConfig,
    check_trainable,
    register,
    schedule,
    validate_targets,
)
from selfimprove.resume import resume_diff

register()


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (Path(CONFIG_DIR) / "recipe").glob("*.yaml")))
def test_recipes_compose_and_validate(recipe):
    cfg = cfg_of(recipe=recipe)
    validate_targets(cfg)
    assert cfg.model.kind == "tiny"


def test_default_recipe_is_quickstart_on_the_embedded_model():
    cfg = cfg_of(recipe=None, model=None)
    assert cfg.recipe == "quickstart" and cfg.model.kind == "embedded"


def composition_error(*overrides: str) -> str:
    """The line `selfimprove train` prints for a mistake Hydra finds while composing."""
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        cfg_of(*overrides)
    return describe(e.value)


@pytest.mark.parametrize(
    ("override", "schema"),
    [
        ("trainer.lrr=0.1", TrainerConfig),
        ("sampler.vllm.gpu_mem=0.5", VLLMConfig),  # nested: the inner node's path and keys, not sampler's
        ("eval.kk=2", EvalConfig),
    ],
)
def test_typo_in_typed_group_names_the_path_and_the_keys_there(override, schema):
    key = override.split("=")[0]
    keys = ", ".join(f.name for f in dataclasses.fields(schema))
    assert composition_error(override) == f"{key}: no such key in {key.rpartition('.')[0]} (keys: {keys})"


@pytest.mark.parametrize("override", ["loop.rounds=many", "sampler.vllm.sleep=often"])
def test_wrong_type_names_the_full_key_and_the_value(override):
    key, value = override.split("=")
    line = composition_error(override)
    assert line.startswith(f"{key}: ") and f"'{value}'" in line, line


@pytest.mark.parametrize(
    ("override", "path", "target"),
    [
        ("+selector.scor=x", "selector.scor", "selfimprove.select.BestOfN"),
        (
            "+verifiers.loglik_base.normalise=1",
            "verifiers.loglik_base.normalise",
            "selfimprove.verify.SequenceLogLik",
        ),
    ],
)
def test_typo_in_target_group_names_the_path_and_the_parameters(override, path, target):
    accepted = [p for p in inspect.signature(get_class(target).__init__).parameters if p != "self"]
    with pytest.raises(ConfigError) as e:
        validate_targets(cfg_of(override))
    assert str(e.value) == f"{path}: not a parameter of {target} (accepted: {accepted})"


def test_typo_in_a_schedule_entry_names_the_entry_and_the_keys_there():
    with pytest.raises(ConfigError) as e:
        schedule(cfg_of("+schedule.0.selector.alpah=3", recipe="score"))
    assert str(e.value) == (
        "schedule[0].selector.alpah: no such key in selector (keys: stage, reward, alpha, estimator, drop_zero)"
    )


def test_wrong_type_in_target_group():
    cfg = cfg_of("selector.per_prompt=lots")
    with pytest.raises(ConfigError, match=r"selector\.per_prompt"):
        validate_targets(cfg)


def test_selector_score_must_come_from_a_verifier():
    cfg = cfg_of("selector.score=p_true")
    with pytest.raises(
        ConfigError, match=r"selector 'best_of_n' reads \['score/p_true'\], which no verifier"
    ):
        validate_targets(cfg)


def test_an_objective_reading_an_unwritten_column_fails_at_config_time():
    cfg = cfg_of("objective.beta=0.1", recipe="grpo_oracle")  # a KL to the base, nothing computes it
    with pytest.raises(ConfigError, match=r"objective 'pg' reads \['ref_logprobs'\]"):
        validate_targets(cfg)
    validate_targets(
        cfg_of("objective.beta=0.1", "+verifier@verifiers.ref=reference_base", recipe="grpo_oracle")
    )
    validate_targets(cfg_of(recipe="sharpen_rl"))  # its base-likelihood reward writes them
    from selfimprove.objectives import PolicyGradient
    from selfimprove.select import BestOfN
    from selfimprove.stages import check_columns
    from selfimprove.verify import GroundTruth

    with pytest.raises(ValueError, match=r"objective 'pg' reads \['advantage'\]"):  # SFT's selector
        check_columns([GroundTruth()], BestOfN(score="correct"), PolicyGradient())


def test_a_stage_reading_an_unwritten_score_fails_naming_both_before_any_model_loads(tmp_path):
    """Through the command line: one line naming the selector, the score and what the verifiers write."""
    from conftest import run_cli

    proc = run_cli(
        [
            "train",
            "model=tiny",
            "recipe=sharpen_sft",
            "selector=borda",
            "selector.score=ptrue",
            f"run.dir={tmp_path / 'run'}",
        ],
        check=False,
    )
    assert proc.returncode != 0
    line = proc.stderr.strip().splitlines()[-1]
    assert "selector 'borda' reads ['score/ptrue']" in line and "score/loglik_base" in line, line
    assert not (tmp_path / "run" / "config.yaml").exists()  # the run never started


def test_resume_diff_ignores_safe_changes():
    a = cfg_of(recipe=None)  # the default recipe, an RL one
    b = cfg_of("loop.rounds=20", "logger=tensorboard", "eval.n_problems=50", recipe=None)
    assert resume_diff(a, b) == []
    c = cfg_of("sampler.temperature=0.7", recipe=None)  # the default RL objective trains at it too
    assert resume_diff(a, c) == ["  objective.temperature: 1.0 -> 0.7", "  sampler.temperature: 1.0 -> 0.7"]


def test_cli_typo_fails_fast_with_key(tmp_path):
    proc = run_cli(["train", *TINY, f"run.dir={tmp_path}/r", "+selector.scor=1"], check=False)
    assert proc.returncode != 0 and "selector.scor" in proc.stderr
    assert not (tmp_path / "r" / "config.yaml").exists()  # failed before the run started


def test_cli_cfg_job_shows_the_resolved_config():
    proc = run_cli(["train", "recipe=oracle_sft", "model=tiny", "--cfg", "job"])
    assert "GroundTruthFilter" in proc.stdout and "kind: tiny" in proc.stdout


def test_cli_help_lists_recipes():
    proc = run_cli(["--help"])
    assert "oracle_sft" in proc.stdout and "quickstart" in proc.stdout


def test_malformed_jsonl_names_file_and_line(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n{"question": oops}\n')
    proc = run_cli(["train", *TINY, f"run.dir={tmp_path}/r", "task=jsonl", f"task.path={data}"], check=False)
    assert proc.returncode != 0 and f"{data}:2" in proc.stderr


def test_prompt_longer_than_context_is_an_error(tmp_path):
    proc = run_cli(["train", *TINY, f"run.dir={tmp_path}/r", "sampler.max_prompt_tokens=8"], check=False)
    assert proc.returncode != 0 and "longer than sampler.max_prompt_tokens=8" in proc.stderr


def test_zero_selected_skips_the_update(tmp_path):
    # The random tiny model never answers correctly, so the oracle filter keeps nothing.
    run_dir = tmp_path / "r"
    proc = run_cli(
        [
            "train",
            *TINY,
            "recipe=oracle_sft",
            f"run.dir={run_dir}",
            "loop.rounds=1",
            "eval.k=0",
            "logger=tensorboard",
        ]
    )
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert "0 samples selected, skipping the update" in proc.stdout
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["update/skipped"] is True and lines[-1]["select/n"] == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loop.prompt_order=random"], "loop.prompt_order: 'random' is not seeded|fixed"),
        (
            ["eval.select_by=accuracy"],
            "eval.select_by: 'accuracy' is not null|dev/accuracy|unlabelled/information",
        ),
        (["eval.select_by=unlabelled/information"], "reads eval.unlabelled_problems, which is 0"),
        (["eval.select_by=dev/accuracy"], "reads eval.dev_problems, which is 0"),
        (["eval.every=0"], "eval.every: 0 (evaluate every N >= 1 rounds"),
    ],
)
def test_prompt_order_and_model_selection_are_checked_at_config_time(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate_targets(cfg_of(*overrides))
    assert message in str(e.value)


def test_a_runs_seed_draws_its_prompts():
    """Seeded: round 1 starts where the seed says, so two seeds train on different prompts; fixed: at 0."""
    from hydra.utils import instantiate

    from selfimprove.loop import first_prompt

    starts = [first_prompt(cfg_of(f"seed={s}")) for s in (0, 1, 0)]
    assert starts[0] == starts[2] != starts[1]
    assert first_prompt(cfg_of("seed=1", "loop.prompt_order=fixed")) == 0
    task = instantiate(cfg_of().task)
    first_round = [[task.train_problem(start + i).messages for i in range(16)] for start in starts[:2]]
    assert first_round[0] != first_round[1]


def test_share_prefix_true_under_flash_attention_is_refused_naming_both_keys():
    """The packed prefix tree needs a 4-D attention mask, which flash attention cannot take: `auto`
    falls back to per row, but `true` must be refused before any model loads."""
    with pytest.raises(ConfigError) as e:
        check_trainable(cfg_of("trainer.share_prefix=true", "model.attn_implementation=flash_attention_2"))
    assert "trainer.share_prefix=true" in str(e.value)
    assert "model.attn_implementation=flash_attention_2" in str(e.value)
    for fine in (
        ["trainer.share_prefix=auto", "model.attn_implementation=flash_attention_2"],
        ["trainer.share_prefix=true", "model.attn_implementation=sdpa"],
        ["trainer.share_prefix=true"],  # transformers' choice: sdpa, or eager
    ):
        check_trainable(cfg_of(*fine))
