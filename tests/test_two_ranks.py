"""The tiny recipe under torchrun with two CPU ranks (gloo) agrees with one rank."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY, run_cli, samples, torchrun
from safetensors.torch import load_file


def _eval_rows(run_dir: Path, round_: int, weights: str) -> list[tuple]:
    """(prompt_id, sample_idx, completion_ids) of a round's greedy held-out rows, by problem."""
    (folder,) = (run_dir / "rounds" / f"r{round_:04d}" / "eval").glob(f"*/{weights}-greedy")
    rows = pq.read_table(folder).to_pylist()
    return sorted(
        ((r["prompt_id"], r["sample_idx"], tuple(r["completion_ids"])) for r in rows),
        key=lambda r: int(r[0].split("-")[1]),
    )


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_match_one(tmp_path, baseline_run):
    run_dir = tmp_path / "run"
    run_cli(["train", *TINY, f"run.dir={run_dir}"], launcher=torchrun(2))

    for round_ in (1, 2):
        rows = samples(run_dir, round_)
        assert len({r[:2] for r in rows}) == len(rows) == 8 * 4  # every prompt sampled once, n each
    # Units carry their own seeds, so the first round's samples do not depend on the number of ranks.
    assert samples(run_dir, 1) == samples(baseline_run, 1)

    # The gradient is a global token-mean on both, so training agrees up to float reduction order.
    one = load_file(next((baseline_run / "checkpoints").glob("r0002-*")) / "model.safetensors")
    two = load_file(next((run_dir / "checkpoints").glob("r0002-*")) / "model.safetensors")
    for name in one:
        torch.testing.assert_close(one[name], two[name], atol=1e-4, rtol=1e-3)

    a = [m for m in _metrics(baseline_run) if "train/loss" in m]
    b = [m for m in _metrics(run_dir) if "train/loss" in m]
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert abs(x["train/loss"] - y["train/loss"]) < 1e-3 * max(1.0, abs(x["train/loss"]))
    # The EMA (what ema.evaluate=[raw,ema] evaluates) averages the same weights on every rank.
    one_ema, two_ema = (
        load_file(next((d / "checkpoints").glob("r0002-*")) / "ema.safetensors")
        for d in (baseline_run, run_dir)
    )
    for name in one_ema:
        torch.testing.assert_close(one_ema[name], two_ema[name], atol=1e-4, rtol=1e-3)

    # Held-out rows, not accuracies (≈ 0 on this model): every problem once, and the same greedy tokens.
    # Before training the weights are equal, so every row is; after it they differ by float noise
    # (≈ 1e-7), which may flip a near-tie: at most one row per evaluation.
    for round_ in (0, 1, 2):
        for weights in ("raw", "ema"):
            one, two = (_eval_rows(d, round_, weights) for d in (baseline_run, run_dir))
            assert [r[:2] for r in one] == [r[:2] for r in two] == [(f"eval-{i}", 0) for i in range(16)]
            differ = sum(a != b for a, b in zip(one, two))
            assert differ <= (0 if round_ == 0 else 1), (round_, weights, differ)


# Four sampling units over three ranks (2, 1, 1) and four micro-batches per step (2, 1+pad, 1+pad).
UNEVEN = [
    *TINY,
    "sampler.batch_size=8",
    "trainer.micro_batch_size=2",
    "trainer.grad_accum=4",
    "eval.k=0",
    "eval.n_problems=8",
    "eval.batch_size=4",
]


@pytest.fixture(scope="module")
def uneven_baseline(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uneven") / "run"
    run_cli(["train", *UNEVEN, f"run.dir={run_dir}"])
    return run_dir


def assert_same_training(one: Path, other: Path) -> None:
    a = load_file(next((one / "checkpoints").glob("r0002-*")) / "model.safetensors")
    b = load_file(next((other / "checkpoints").glob("r0002-*")) / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-3)
    for round_ in (1, 2):
        rows = samples(other, round_)
        assert len({r[:2] for r in rows}) == len(rows) == 8 * 4


def test_three_ranks_with_an_uneven_split_match_one(tmp_path, uneven_baseline):
    run_dir = tmp_path / "run"
    run_cli(["train", *UNEVEN, f"run.dir={run_dir}"], launcher=torchrun(3))
    assert samples(run_dir, 1) == samples(uneven_baseline, 1)
    assert_same_training(uneven_baseline, run_dir)


@pytest.mark.parametrize(
    ("before", "after", "crash_at"),
    [(2, 1, "update:r2:s1"), (1, 2, "sample:r2:u1")],  # 2 -> 3: test_backends (FSDP2)
)
def test_resume_on_another_number_of_ranks(tmp_path, uneven_baseline, before, after, crash_at):
    run_dir = tmp_path / "run"
    launch = {1: None, 2: torchrun(2)}
    killed = run_cli(
        ["train", *UNEVEN, f"run.dir={run_dir}"],
        launcher=launch[before],
        env={"SELFIMPROVE_CRASH_AT": crash_at},
        check=False,
    )
    assert killed.returncode != 0
    run_cli(["train", *UNEVEN, f"run.dir={run_dir}", "resume=auto"], launcher=launch[after])
    assert samples(run_dir, 1) == samples(uneven_baseline, 1)
    assert_same_training(uneven_baseline, run_dir)
