"""Kill -9 a run at several points, resume it, and get bit-identical weights and the same samples."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import TINY, assert_same_final_state, assert_same_samples, run_cli


@pytest.mark.parametrize(
    "crash_at",
    [
        "update:r2:s1",  # mid-update: an optimizer step taken, no checkpoint for it
        "checkpoint:r0001-s000003",  # during a checkpoint write, before its rename
        # mid-sampling and between phases, at 20 random moments on two ranks: tests/test_storm.py;
        # mid-sampling on one rank resumed on two: tests/test_two_ranks.py
    ],
)
def test_kill_and_resume_is_bit_identical(tmp_path, baseline_run, crash_at):
    run_dir = tmp_path / "run"
    killed = run_cli(
        ["train", *TINY, f"run.dir={run_dir}"], env={"SELFIMPROVE_CRASH_AT": crash_at}, check=False
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    latest = run_dir / "checkpoints" / "latest"
    if latest.exists():  # `latest` always names a complete checkpoint
        assert (run_dir / "checkpoints" / latest.read_text().strip() / "journal.json").exists()
    if crash_at.startswith("checkpoint"):
        assert not latest.exists()  # the interrupted write never became `latest`
        assert (run_dir / "checkpoints" / ".tmp-r0001-s000003").exists()

    run_cli(["train", *TINY, f"run.dir={run_dir}", "resume=auto"])

    assert_same_final_state(run_dir, baseline_run)
    assert_same_samples(run_dir, baseline_run, range(1, 3))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines if "eval/accuracy" in x] == [0, 1, 2]
    assert [x["step"] for x in lines if "train/loss" in x] == list(range(1, 7))


def test_resume_refuses_incompatible_change(baseline_run):
    proc = run_cli(["train", *TINY, f"run.dir={baseline_run}", "resume=auto", "trainer.lr=0.5"], check=False)
    assert proc.returncode != 0
    assert "trainer.lr: 0.0003 -> 0.5" in proc.stderr


def test_more_rounds_with_a_decaying_schedule_is_refused(baseline_run):
    # The linear schedule spans rounds × steps: more rounds would raise the learning rate again.
    proc = run_cli(["train", *TINY, f"run.dir={baseline_run}", "resume=auto", "loop.rounds=3"], check=False)
    assert proc.returncode != 0
    assert "loop.rounds: 2 -> 3 (trainer.scheduler=linear" in proc.stderr


def test_resume_allows_more_rounds_with_a_constant_schedule(tmp_path):
    run_dir = tmp_path / "run"
    fast = [*TINY, "trainer.scheduler=constant", "eval.k=0", f"run.dir={run_dir}"]
    run_cli(["train", *fast, "loop.rounds=1"])
    run_cli(["train", *fast, "resume=auto", "loop.rounds=2"])
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines if "eval/accuracy" in x] == [0, 1, 2]


def test_changed_eval_settings_are_not_served_from_the_cache(tmp_path, baseline_run):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(baseline_run, run_dir)
    # The finished run resumes at its last evaluation, now with 8 held-out problems instead of 16.
    run_cli(["train", *TINY, f"run.dir={run_dir}", "resume=auto", "eval.n_problems=8", "eval.k=0"])
    folders = sorted((run_dir / "rounds" / "r0002" / "eval").glob("*/raw-greedy"))
    assert len(folders) == 2  # the old results stay, the new ones sit beside them
    sizes = sorted(pq.read_table(f).num_rows for f in folders)
    assert sizes == [8, 16]


def test_existing_run_without_resume_is_refused(baseline_run):
    proc = run_cli(["train", *TINY, f"run.dir={baseline_run}"], check=False)
    assert proc.returncode != 0 and "resume=auto" in proc.stderr


def test_sigterm_checkpoints_and_resumes(tmp_path, baseline_run):
    """SLURM-style preemption: SIGTERM writes a checkpoint, exits cleanly, and resume=auto finishes
    with the same weights as a run never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "selfimprove", "train", *TINY, f"run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # wait for the first optimizer step
        if metrics.exists() and "train/loss" in metrics.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by signal" in out
    run_cli(["train", *TINY, f"run.dir={run_dir}", "resume=auto"])
    assert_same_final_state(run_dir, baseline_run)


def test_eval_command_on_a_run_folder(baseline_run):
    proc = run_cli(["eval", str(baseline_run), "eval.n_problems=8", "eval.k=0"])
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert 0.0 <= result["eval/accuracy"] <= 1.0 and "eval_ema/accuracy" in result
    assert result["checkpoint"].endswith("r0002-s000006")


def test_dropout_is_seeded_per_micro_batch_so_resume_stays_bit_identical(tmp_path):
    # Killed in round 2's update, the run resumes from round 1's checkpoint and finds round 2's samples
    # on disk: unseeded dropout would then draw from a different RNG state than the uninterrupted run.
    dropout = [*TINY, "trainer.lora_dropout=0.1", "eval.k=0", "eval.n_problems=4"]
    want, got = tmp_path / "want", tmp_path / "got"
    run_cli(["train", *dropout, f"run.dir={want}"])
    killed = run_cli(
        ["train", *dropout, f"run.dir={got}"], env={"SELFIMPROVE_CRASH_AT": "update:r2:s1"}, check=False
    )
    assert killed.returncode == -9
    run_cli(["train", *dropout, f"run.dir={got}", "resume=auto"])
    assert_same_final_state(got, want)


# RL: GRPO with a label-free reward (self-certainty: the tiny random model never answers right), KL to
# the base, two clipped steps per round on the same samples (the off-policy variant), EMA on.
RL = [
    *TINY,
    "recipe=grpo_oracle",
    "selector.reward=self_certainty",
    "+verifier@verifiers.reference=reference_base",
    "objective.beta=0.05",
    "trainer.steps_per_round=2",
    "eval.k=0",
    "eval.n_problems=4",
    "eval.dev_problems=4",
    "eval.select_by=dev/accuracy",
]


@pytest.fixture(scope="module")
def rl_baseline(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("rl") / "run"
    run_cli(["train", *RL, f"run.dir={run_dir}"])
    return run_dir


@pytest.mark.parametrize("crash_at", ["verify:r2:u0", "update:r2:s1"])
def test_rl_run_killed_mid_round_resumes_bit_identical(tmp_path, rl_baseline, crash_at):
    run_dir = tmp_path / "run"
    killed = run_cli(
        ["train", *RL, f"run.dir={run_dir}"], env={"SELFIMPROVE_CRASH_AT": crash_at}, check=False
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_cli(["train", *RL, f"run.dir={run_dir}", "resume=auto"])
    assert_same_final_state(run_dir, rl_baseline)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "train/loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4]
    assert all(x["pg/kl"] >= 0 and 0 <= x["pg/clip_frac"] <= 1 for x in steps)
    # model selection on the dev split: the round with the best dev accuracy, its test metrics beside it
    selected = json.loads((run_dir / "selected.json").read_text())
    rounds = {x["round"]: x for x in lines if "dev/accuracy" in x}
    assert set(rounds) == {0, 1, 2} and selected["selected/round"] in rounds
    best = rounds[selected["selected/round"]]
    assert selected["selected/dev/accuracy"] == max(x["dev/accuracy"] for x in rounds.values())
    assert selected["selected/eval/accuracy"] == best["eval/accuracy"]


# SCoRe: two-attempt episodes, Stage I in round 1 and Stage II from round 2 (schedule), a per-attempt
# KL to the base; self-certainty as the reward (the tiny random model never answers right).
SCORE = [
    *TINY,
    "recipe=score",
    "+verifier@verifiers.self_certainty=self_certainty",
    "selector.reward=self_certainty",
    "schedule.0.until_round=1",
    "loop.rounds=3",
    "loop.prompts_per_round=4",
    "trainer.steps_per_round=2",
    "eval.k=0",
    "eval.n_problems=4",
    "eval.every=1",
]


@pytest.fixture(scope="module")
def score_baseline(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("score") / "run"
    run_cli(["train", *SCORE, f"run.dir={run_dir}"])
    return run_dir


@pytest.mark.parametrize("crash_at", ["update:r2:s1", "sample:r3:u0"])
def test_score_run_killed_in_stage_two_resumes_bit_identical(tmp_path, score_baseline, crash_at):
    baseline, run_dir = score_baseline, tmp_path / "run"
    killed = run_cli(
        ["train", *SCORE, f"run.dir={run_dir}"], env={"SELFIMPROVE_CRASH_AT": crash_at}, check=False
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_cli(["train", *SCORE, f"run.dir={run_dir}", "resume=auto"])
    assert_same_final_state(run_dir, baseline)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stages = {x["round"]: x["schedule/stage"] for x in lines if "schedule/stage" in x}
    assert stages == {1: 1, 2: 2, 3: 2}
    assert all(x["train/grad_norm"] > 0 for x in lines if "train/loss" in x)  # the weights did move
    evals = [x for x in lines if "eval/accuracy_t2" in x]
    assert [x["round"] for x in evals] == [0, 1, 2, 3]


# DITTO on the text task: each step DITTO or MLE by a coin seeded per step, so a resumed run flips the
# same coins.
DITTO = [
    "recipe=ditto",
    "model=tiny",
    "loop.rounds=2",
    "loop.prompts_per_round=8",
    "trainer.steps_per_round=4",
    "trainer.micro_batch_size=4",
    "selector.max_tokens=96",
    "eval.n_problems=4",
    "eval.max_new_tokens=8",
    "ema.enabled=true",
]


def test_ditto_run_killed_mid_update_resumes_bit_identical(tmp_path):
    baseline, run_dir = tmp_path / "baseline", tmp_path / "run"
    run_cli(["train", *DITTO, f"run.dir={baseline}"])
    killed = run_cli(
        ["train", *DITTO, f"run.dir={run_dir}"], env={"SELFIMPROVE_CRASH_AT": "update:r2:s2"}, check=False
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_cli(["train", *DITTO, f"run.dir={run_dir}", "resume=auto"])
    assert_same_final_state(run_dir, baseline)
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    coins = [x["ditto/step_is_ditto"] for x in steps if "train/loss" in x]
    assert len(coins) == 8 and 0 < sum(coins) < 8  # both kinds of step happened
    evals = [x for x in steps if "eval/rep_4" in x]
    assert [x["round"] for x in evals] == [0, 2] and all(x["eval/perplexity"] > 1 for x in evals)
