"""A preemption storm: a two-rank tiny run SIGKILLed (agent and workers at once, like a node failure)
at 12 seeded random moments, two of them inside checkpoint writes, resumed with resume=auto after each;
then it must end exactly where an uninterrupted run ends: weights, EMA, optimizer and scheduler state,
the samples of every round and every metrics.jsonl row, each once.

A moment is "δ seconds after rank 0 passes its n-th fault point in this attempt" (n = 0: after the run
folder's config is written, i.e. during the model's load and the checkpoint's restore), with n and δ
drawn from a seeded generator; the points come from SELFIMPROVE_TRACE (selfimprove/faults.py). n is
kept below what is left of the run, so the storm never lets it finish early."""

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch
from conftest import TINY, assert_same_final_state, assert_same_samples, run_cli, torchrun

# The tiny recipe over six rounds: about 65 fault points, more than 12 kills of up to 5 points each get
# through, so the run never ends early and the kills land in every phase.
STORM = [*TINY, "loop.rounds=6"]
SEED, KILLS = 22, 12
CHECKPOINT_KILLS = (4, 11)  # these attempts are killed inside the write of the next checkpoint
TIMING = ("phase_seconds", "round_seconds", "compute_seconds", "tokens_per_second", "max_rss_gb")


@pytest.fixture(scope="module")
def storm_baseline(tmp_path_factory) -> tuple[Path, list[str]]:
    """The storm's run uninterrupted, and the fault points its rank 0 passes, in order."""
    folder = tmp_path_factory.mktemp("storm-baseline")
    trace = folder / "trace"
    run_cli(
        ["train", *STORM, f"run.dir={folder / 'run'}"],
        launcher=torchrun(2),
        env={"SELFIMPROVE_TRACE": str(trace)},
    )
    return folder / "run", trace.read_text().split()


def _kill_all(agent: subprocess.Popen) -> None:
    """SIGKILL torchrun's agent and its workers (they run in sessions of their own: no process group
    reaches them all), workers first so the agent cannot react."""
    try:
        workers = psutil.Process(agent.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    for p in [*workers]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    agent.send_signal(signal.SIGKILL)
    agent.wait(timeout=60)
    psutil.wait_procs(workers, timeout=60)


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _attempt(run_dir: Path, folder: Path, k: int, n: int, delay: float, hold: str | None) -> str:
    """One launch, killed n points (+ delay s) in, or inside the checkpoint write `hold`; returns the
    last point passed ("start" if none)."""
    trace, config = folder / f"trace-{k}", run_dir / "config.yaml"
    before = config.stat().st_ino if config.exists() else None
    env = {**os.environ, "SELFIMPROVE_TRACE": str(trace)}
    if hold:
        (folder / f"holds-{k}").mkdir()
        env.update(SELFIMPROVE_HOLD_AT=hold, SELFIMPROVE_HOLD_DIR=str(folder / f"holds-{k}"))
    cmd = [*torchrun(2), "selfimprove", "train", *STORM, f"run.dir={run_dir}", "resume=auto"]
    with open(folder / f"log-{k}", "w") as log:
        agent = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    marker = folder / f"holds-{k}" / (hold or "-").replace(":", "_")
    deadline = time.monotonic() + 300
    try:
        while not (  # the moment: the config rewritten (a new file) and n points passed, or the hold
            (marker.exists() if hold else len(_lines(trace)) >= n)
            and config.exists()
            and config.stat().st_ino != before
        ):
            assert agent.poll() is None, (
                f"attempt {k} ended before its kill:\n{(folder / f'log-{k}').read_text()}"
            )
            assert time.monotonic() < deadline, f"attempt {k}: no progress in 300 s"
            time.sleep(0.005)
        time.sleep(delay)
    finally:
        _kill_all(agent)
    return (_lines(trace) or ["start"])[-1]


def _optimizer_equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_optimizer_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_optimizer_equal(x, y) for x, y in zip(a, b))
    return a == b


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def test_preemption_storm(tmp_path, storm_baseline):
    baseline, points = storm_baseline
    rng = random.Random(SEED)
    run_dir = tmp_path / "run"
    passed: Counter = Counter()  # points passed over all attempts, bounding how far the run can be
    last = []
    for k in range(KILLS):
        # What is left of the run is at least the points not yet passed that many times: stay below it.
        left = sum((Counter(points) - passed).values())
        n = rng.randint(0, max(0, min(5, left - 4)))
        delay = rng.uniform(0, 0.05)
        latest = run_dir / "checkpoints" / "latest"
        done = latest.read_text().strip() if latest.exists() else ""
        hold = next(p for p in points if p.startswith("checkpoint:") and p.split(":")[1] > done)
        last.append(_attempt(run_dir, tmp_path, k, n, delay, hold if k in CHECKPOINT_KILLS else None))
        passed += Counter(_lines(tmp_path / f"trace-{k}"))
    assert not (run_dir / "rounds" / "r0006" / "metrics.json").exists(), "the storm let the run finish"

    # The kills fell in every phase, two inside checkpoint writes (before their rename).
    phases = Counter(x.split(":")[0] for x in last)
    print(f"storm: {KILLS} kills, the last point passed before each: {last}")
    assert len(last) == KILLS and phases["checkpoint"] >= 2, last
    assert {"update", "eval", "start"} <= set(phases) and phases["sample"] + phases["verify"] > 0, last

    run_cli(["train", *STORM, f"run.dir={run_dir}", "resume=auto"], launcher=torchrun(2))

    assert_same_final_state(run_dir, baseline)
    ckpt = {
        d: d / "checkpoints" / (d / "checkpoints" / "latest").read_text().strip() for d in (baseline, run_dir)
    }
    for file in ("optimizer.pt", "scheduler.pt"):
        a, b = (torch.load(ckpt[d] / file, weights_only=False) for d in (baseline, run_dir))
        assert _optimizer_equal(a, b), file
    assert json.loads((ckpt[baseline] / "journal.json").read_text()) == json.loads(
        (ckpt[run_dir] / "journal.json").read_text()
    )
    assert_same_samples(run_dir, baseline, range(1, 7))
    assert _metrics(run_dir) == _metrics(baseline)  # no row lost or repeated, every value the same
