"""SIGTERM/SIGUSR1 (SLURM preemption) in every phase: the run checkpoints what it must, exits 0, and
`resume=auto` finishes with the weights of a run never interrupted."""

import json

import pytest
from conftest import TINY, assert_same_final_state, run_cli


def _train_lines(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "train/loss" in x]


@pytest.mark.parametrize(
    "signal_at",
    [
        "sample:r2:u0",  # while sampling: round 1 is checkpointed, round 2's first shard kept
        "verify:r1:u0",  # while scoring: stops before the update
        "update:r1:s1,checkpoint:r0001-s000001",  # a second SIGTERM during the preemption checkpoint
        # while evaluating: tests/test_slurm.py (scontrol requeue there sends SIGTERM)
    ],
)
def test_sigterm_in_any_phase_stops_cleanly_and_resumes(tmp_path, baseline_run, signal_at):
    run_dir = tmp_path / "run"
    proc = run_cli(["train", *TINY, f"run.dir={run_dir}"], env={"SELFIMPROVE_SIGTERM_AT": signal_at})
    assert "stopped by signal" in proc.stdout
    if signal_at.startswith("sample"):
        assert (
            len(_train_lines(run_dir)) == 3
            and not (run_dir / "rounds/r0002/samples/unit-00001.parquet").exists()
        )
    if signal_at.startswith("verify"):
        assert not (run_dir / "metrics.jsonl").exists() or not _train_lines(run_dir)
    if signal_at.startswith("eval"):
        assert len(_train_lines(run_dir)) == 3 and not (run_dir / "rounds/r0001/metrics.json").exists()
    if signal_at.startswith("update"):
        assert (run_dir / "checkpoints" / "r0001-s000001" / "model.safetensors").exists()
    run_cli(["train", *TINY, f"run.dir={run_dir}", "resume=auto"])
    assert_same_final_state(run_dir, baseline_run)
