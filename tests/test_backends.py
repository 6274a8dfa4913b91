"""DeepSpeed ZeRO-2/3 and FSDP2 through accelerate, on two and three CPU ranks over gloo: the same
weights and EMA as one plain rank, resumable after kill -9 (FSDP2 on another number of ranks); the
sharded EMA gathered for an EMA teacher whatever the split of verify units; DeepSpeed's own skip of a
non-finite step."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, run_cli, run_cli_within, samples, torchrun
from safetensors.torch import load_file

from selfimprove import backends, extras
from selfimprove.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
needs_deepspeed = pytest.mark.skipif(not extras.available("deepspeed"), reason="needs the deepspeed extra")


def assert_same_run(one: Path, other: Path) -> None:
    """Same last checkpoint (weights and EMA, gathered from shards), every prompt sampled once."""
    for file in ("model.safetensors", "ema.safetensors"):
        a = load_file(next((one / "checkpoints").glob("r0002-*")) / file)
        b = load_file(next((other / "checkpoints").glob("r0002-*")) / file)
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)
    for round_ in (1, 2):
        rows = samples(other, round_)
        assert len({r[:2] for r in rows}) == len(rows) == 8 * 4  # no prompt lost or repeated
    assert samples(other, 1) == samples(one, 1)


def killed_in_round_two(args: list[str], run_dir: Path) -> Path:
    """Runs on two ranks, killed in round 2's update; returns round 1's checkpoint."""
    killed = run_cli(args, launcher=torchrun(2), env={"SELFIMPROVE_CRASH_AT": "update:r2:s2"}, check=False)
    assert killed.returncode != 0
    return next((run_dir / "checkpoints").glob("r0001-*"))


def test_fsdp2_killed_on_two_ranks_resumes_on_three(tmp_path, baseline_run):
    run_dir = tmp_path / "run"
    args = ["train", *TINY, "launcher=fsdp2", f"run.dir={run_dir}"]
    saved = killed_in_round_two(args, run_dir)
    assert (saved / "optimizer.pt").exists() and not (saved / "optimizer-shards").exists()
    run_cli([*args, "resume=auto"], launcher=torchrun(3))
    assert_same_run(baseline_run, run_dir)


@needs_deepspeed
def test_zero2_on_two_ranks_matches_one(tmp_path, baseline_run):
    run_dir = tmp_path / "run"
    run_cli(["train", *TINY, "launcher=zero2", f"run.dir={run_dir}"], launcher=torchrun(2))
    assert_same_run(baseline_run, run_dir)


@needs_deepspeed
def test_zero3_killed_resumes_and_refuses_another_world_size(tmp_path, baseline_run):
    run_dir = tmp_path / "run"
    args = ["train", *TINY, "launcher=zero3", f"run.dir={run_dir}"]
    saved = killed_in_round_two(args, run_dir)
    assert len(list((saved / "optimizer-shards").rglob("*optim_states.pt"))) == 2  # one per rank

    # DeepSpeed's optimizer shards load only on as many ranks: refused, named, nothing written
    other = run_cli([*args, "resume=auto"], check=False)
    assert other.returncode != 0
    assert "saved on 2 ranks and cannot be loaded on 1" in other.stderr
    assert not list((run_dir / "checkpoints").glob("r0002-*"))

    run_cli([*args, "resume=auto"], launcher=torchrun(2))
    assert_same_run(baseline_run, run_dir)


# An EMA teacher under FSDP2: each rank averages its slice, so "ema" needs a collective gather, which
# verify must make on every rank before its units (a rank without a unit would not join one inside).
# The EMA is shared by nothing before round 1's verify (no round 0, raw-only evaluation).
EMA_TEACHER = [
    *TINY,
    "launcher=fsdp2",
    "+verifier@verifiers.teacher=ema_teacher",
    "verifiers.teacher.n=2",
    "loop.rounds=1",
    "eval.before=false",
    "ema.evaluate=[raw]",
    "eval.k=0",
    "eval.n_problems=4",
    "trainer.steps_per_round=1",
]
HUNG_AFTER_S = 120  # a two-rank run here takes ~10 s; a collective that never pairs up, forever


def teacher_scores(run_dir: Path) -> list[float]:
    """Round 1's ema_teacher scores, every sample's (8 prompts x 4)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(run_dir / "rounds" / "r0001" / "scored").to_pylist()
    assert len(rows) == 8 * 4
    return [r["score/ema_teacher"] for r in rows]


def test_fsdp2_ema_teacher_with_fewer_verify_units_than_ranks(tmp_path):
    run_dir = tmp_path / "run"
    # sampler.batch_size=32 puts round 1's 8 prompts x 4 samples in one unit: rank 1 has none
    args = ["train", *EMA_TEACHER, "sampler.batch_size=32", f"run.dir={run_dir}"]
    run_cli_within(HUNG_AFTER_S, args, launcher=torchrun(2))
    assert len(list((run_dir / "rounds" / "r0001" / "scored").glob("unit-*.parquet"))) == 1
    assert all(s in (0.0, 1.0) for s in teacher_scores(run_dir))


def test_fsdp2_ema_teacher_resumed_with_one_ranks_verify_unit_done(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", *EMA_TEACHER, f"run.dir={run_dir}"]  # two units: one per rank
    killed = run_cli_within(
        HUNG_AFTER_S, args, launcher=torchrun(2), env={"SELFIMPROVE_CRASH_AT": "verify:r1:u0"}, check=False
    )
    assert killed.returncode != 0
    scored = run_dir / "rounds" / "r0001" / "scored"
    assert (scored / "unit-00000.parquet").exists()
    # whether rank 1 wrote its unit before the kill is a race: take it away, so only rank 0's is done
    for leftover in scored.glob("unit-00001.*"):
        leftover.unlink()
    run_cli_within(HUNG_AFTER_S, [*args, "resume=auto"], launcher=torchrun(2))
    assert all(s in (0.0, 1.0) for s in teacher_scores(run_dir))


@needs_deepspeed
def test_zero3_skips_a_nonfinite_step_in_bf16_on_two_ranks(tmp_path):
    # The step runs inside DeepSpeed, whose own check must skip it (in bf16 too, with its optimizer's
    # `overflow` set: else the update stops with NonFiniteStepApplied). The round's only step is NaN,
    # so the weights keep their start: LoRA's B zero, not NaN, nor moved.
    run_dir = tmp_path / "run"
    args = [*TINY, "launcher=zero3", "model.dtype=bfloat16", "loop.rounds=1"]
    args += ["eval.before=false", "eval.k=0", "eval.n_problems=4", "trainer.steps_per_round=1"]
    proc = run_cli_within(
        HUNG_AFTER_S,
        ["train", *args, f"run.dir={run_dir}"],
        launcher=torchrun(2),
        env={"SELFIMPROVE_NAN_AT": "update:r1:s1"},
    )
    assert "step 1: loss or gradient not finite, step skipped" in proc.stdout + proc.stderr
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x.get("train/skipped_nonfinite") for x in steps if "train/loss" in x] == [True]
    ckpt = next((run_dir / "checkpoints").glob("r0001-*"))
    weights, ema = load_file(ckpt / "model.safetensors"), load_file(ckpt / "ema.safetensors")
    assert any("lora_B" in name for name in weights)
    for name, tensor in weights.items():
        assert tensor.isfinite().all(), name
        assert "lora_B" not in name or not tensor.any(), name
        assert torch.equal(ema[name], tensor), name  # the EMA's copies (t <= warmup) of unmoved weights


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_configs_validate(stage):
    from deepspeed.runtime.config import DeepSpeedConfig
    from omegaconf import OmegaConf

    from selfimprove.config import Config

    cfg = OmegaConf.structured(Config)
    cfg.launcher.backend, cfg.launcher.zero_stage = "deepspeed", stage
    cfg.trainer.micro_batch_size, cfg.trainer.max_grad_norm, cfg.model.dtype = 4, 0.5, "bfloat16"
    ds = DeepSpeedConfig(backends.deepspeed_config(cfg))  # DeepSpeed's own parser and checks
    assert (ds.zero_optimization_stage, ds.train_micro_batch_size_per_gpu) == (stage, 4)
    assert ds.gradient_clipping == 0.5 and ds.bfloat16_config.enabled and not ds.float16_config.enabled
    assert ds.gradient_accumulation_steps == 1  # the update marks each step's boundary itself


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3", "fsdp2"])
def test_accelerate_config_files_match_the_launcher_options(name):
    launcher = yaml.safe_load((REPO / "configs" / "launcher" / f"{name}.yaml").read_text())
    accelerate = yaml.safe_load((REPO / "scripts" / "accelerate" / f"{name}.yaml").read_text())
    kind = {"ddp": "MULTI_GPU", "deepspeed": "DEEPSPEED", "fsdp2": "FSDP"}[launcher["backend"]]
    assert accelerate["distributed_type"] == kind
    if kind == "DEEPSPEED":
        assert accelerate["deepspeed_config"]["zero_stage"] == launcher["zero_stage"]
    if kind == "FSDP":
        assert accelerate["fsdp_config"]["fsdp_version"] == 2


def test_a_missing_backend_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setattr(extras, "available", lambda module: False)
    with pytest.raises(ConfigError) as e:
        extras.require("deepspeed", "deepspeed", "launcher.backend=deepspeed")
    assert str(e.value) == "launcher.backend=deepspeed needs deepspeed: pip install 'selfimprove[deepspeed]'"


def test_a_launcher_typo_and_a_mismatched_accelerate_launch_are_named(monkeypatch):
    from omegaconf import OmegaConf

    from selfimprove.config import Config

    cfg = OmegaConf.structured(Config)
    cfg.launcher.backend = "zero"
    with pytest.raises(ConfigError, match=r"launcher.backend: 'zero' is not ddp\|deepspeed\|fsdp2"):
        backends.check(cfg)
    cfg.launcher.backend = "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="launched by accelerate with fsdp2.*add launcher=fsdp2"):
        backends.check(cfg)
