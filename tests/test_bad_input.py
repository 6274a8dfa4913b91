"""Bad input, tried on purpose: each gets a one-line message that names the file, line or key, and
nothing is lost. (Config typos, malformed data and prompts too long: test_config.py, test_cli.py,
test_tasks.py.)"""

import json

import pytest
from conftest import TINY, assert_same_final_state, run_cli
from safetensors.torch import load_file

from selfimprove import extras


def _error_line(proc) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def test_eval_n_problems_above_the_held_out_size(tmp_path):
    proc = run_cli(["train", *TINY, f"run.dir={tmp_path}/r", "eval.n_problems=100000"], check=False)
    line = _error_line(proc)
    assert "eval.n_problems=100000" in line and "held-out" in line


def test_model_path_that_does_not_exist(tmp_path):
    proc = run_cli(["train", *TINY, "model=hf", f"model.path={tmp_path}/nowhere"], check=False)
    assert f"model.path: {tmp_path}/nowhere does not exist" in _error_line(proc)


def test_fp16_training_is_refused(tmp_path):
    proc = run_cli(["train", *TINY, f"run.dir={tmp_path}/r", "model.dtype=float16"], check=False)
    assert "model.dtype=float16 cannot train" in _error_line(proc)


@pytest.mark.parametrize("launcher", ["ddp", "zero2"])
def test_nan_loss_skips_the_step_and_never_reaches_a_checkpoint(tmp_path, launcher):
    # under DeepSpeed the step runs inside DeepSpeed: its own overflow check must skip it (a NaN step
    # applied would leave NaN weights, which the checks below see)
    if launcher == "zero2" and not extras.available("deepspeed"):
        pytest.skip("needs the deepspeed extra")
    run_dir = tmp_path / "r"
    args = [
        *TINY,
        f"run.dir={run_dir}",
        "loop.rounds=1",
        "eval.k=0",
        "eval.n_problems=4",
        f"launcher={launcher}",
    ]
    proc = run_cli(["train", *args], env={"SELFIMPROVE_NAN_AT": "update:r1:s2"})
    assert "step 2: loss or gradient not finite, step skipped" in proc.stdout + proc.stderr
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in steps if "train/loss" in x]
    assert [x.get("train/skipped_nonfinite", False) for x in steps] == [False, True, False]
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    for name, tensor in {
        **load_file(ckpt / "model.safetensors"),
        **load_file(ckpt / "ema.safetensors"),
    }.items():
        assert tensor.isfinite().all(), name


def test_truncated_weights_in_the_latest_checkpoint_fall_back_to_the_one_before(tmp_path, baseline_run):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(baseline_run, run_dir)
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = run_cli(["train", *TINY, f"run.dir={run_dir}", "resume=auto"])
    said = proc.stdout + proc.stderr
    assert "r0002-s000006" in said and "r0001-s000003" in said  # which one failed, which one is used
    assert_same_final_state(run_dir, baseline_run)


def test_empty_data_file_names_it_and_leaves_no_run_behind(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    run_dir = tmp_path / "r"
    proc = run_cli(["train", *TINY, f"run.dir={run_dir}", "task=jsonl", f"task.path={data}"], check=False)
    assert str(data) in _error_line(proc)
    assert not (run_dir / "config.yaml").exists()  # fixing the file and running again just works
