"""Config errors are caught before any model loads and name the key; recipes compose."""

import json
from pathlib import Path

import pytest
from conftest import TINY, run_cli
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from selfimprove.cli import CONFIG_DIR
from selfimprove.config import ConfigError, register, validate_targets
from selfimprove.resume import resume_diff

register()


def cfg_of(*overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (Path(CONFIG_DIR) / "recipe").glob("*.yaml")))
def test_recipes_compose_and_validate(recipe):
    cfg = cfg_of(f"recipe={recipe}", "model=tiny")
    validate_targets(cfg)
    assert cfg.model.kind == "tiny"


def test_default_recipe_is_quickstart_on_the_embedded_model():
    cfg = cfg_of()
    assert cfg.recipe == "quickstart" and cfg.model.kind == "embedded"


def test_typo_in_typed_group_names_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        cfg_of("trainer.lrr=0.1")
    assert "lrr" in str(e.value.__cause__ or e.value)


def test_wrong_type_names_the_key():
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        cfg_of("loop.rounds=many")
    assert "loop.rounds" in str(e.value.__cause__ or e.value) or "rounds" in str(e.value)


def test_typo_in_target_group_names_the_key():
    cfg = cfg_of("recipe=sharpen_sft", "+selector.scor=x")
    with pytest.raises(ConfigError, match=r"selector\.scor: not a parameter"):
        validate_targets(cfg)


def test_wrong_type_in_target_group():
    cfg = cfg_of("recipe=sharpen_sft", "selector.per_prompt=lots")
    with pytest.raises(ConfigError, match=r"selector\.per_prompt"):
        validate_targets(cfg)


def test_selector_score_must_come_from_a_verifier():
    cfg = cfg_of("recipe=sharpen_sft", "selector.score=p_true")
    with pytest.raises(
        ConfigError, match=r"selector 'best_of_n' reads \['score/p_true'\], which no verifier"
    ):
        validate_targets(cfg)


def test_an_objective_reading_an_unwritten_column_fails_at_config_time():
    cfg = cfg_of("recipe=grpo_oracle", "objective.beta=0.1")  # a KL to the base, nothing computes it
    with pytest.raises(ConfigError, match=r"objective 'pg' reads \['ref_logprobs'\]"):
        validate_targets(cfg)
    validate_targets(
        cfg_of("recipe=grpo_oracle", "objective.beta=0.1", "+verifier@verifiers.ref=reference_base")
    )
    validate_targets(cfg_of("recipe=sharpen_rl"))  # its base-likelihood reward writes them
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
    a = cfg_of("model=tiny")
    b = cfg_of("model=tiny", "loop.rounds=20", "logger=tensorboard", "eval.n_problems=50")
    assert resume_diff(a, b) == []
    c = cfg_of("model=tiny", "sampler.temperature=0.7")  # the default RL objective trains at it too
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
