import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one OpenMP thread each, or their spinning threads slow both 5-10x.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]

# The tiny test recipe: SFT-Sharpening (label-free best-of-n by log-prob under the frozen base, which
# is the LoRA policy with its adapter off), with EMA, at toy size.
TINY = [
    "recipe=sharpen_sft",
    "eval.every=1",
    "model=tiny",
    "loop.rounds=2",
    "loop.prompts_per_round=8",
    "sampler.n=4",
    "sampler.batch_size=16",
    "eval.n_problems=16",
    "eval.k=2",
    "eval.k_problems=8",
    "eval.batch_size=16",
    "trainer.steps_per_round=3",
    "trainer.micro_batch_size=4",
    "trainer.grad_accum=2",
    "ema.enabled=true",
    "ema.evaluate=[raw,ema]",
]


def final_state(run_dir: Path) -> dict:
    """The weights and EMA (prefixed `ema.`) of a run's latest checkpoint."""
    from safetensors.torch import load_file

    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    state = load_file(ckpt / "model.safetensors")
    state.update({f"ema.{k}": v for k, v in load_file(ckpt / "ema.safetensors").items()})
    return state


def samples(run_dir: Path, round_: int) -> list[tuple]:
    """A round's samples as sorted (prompt_id, sample_idx, completion_ids) tuples."""
    import pyarrow.parquet as pq

    table = pq.read_table(run_dir / "rounds" / f"r{round_:04d}" / "samples").to_pylist()
    return sorted((r["prompt_id"], r["sample_idx"], tuple(r["completion_ids"])) for r in table)


def assert_same_final_state(run_dir: Path, baseline: Path) -> None:
    """The latest checkpoints' weights and EMA bit-identical, tensor by tensor (named when not)."""
    import torch

    want, got = final_state(baseline), final_state(run_dir)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def assert_same_samples(run_dir: Path, baseline: Path, rounds: range, per_round: int = 8 * 4) -> None:
    """Each round's samples the baseline's, every (prompt, sample) once: none lost or duplicated."""
    for round_ in rounds:
        rows = samples(run_dir, round_)
        assert rows == samples(baseline, round_)
        assert len({r[:2] for r in rows}) == len(rows) == per_round


def letter_task(folder: Path, rows: int = 40) -> list[str]:
    """Overrides for a JSONL task whose answer is a completion's first lowercase letter: answers the
    tiny random model varies from sample to sample and round to round (on arithmetic it never writes
    a number, so every answer is None and agreement-based signals are constant)."""
    import json

    data = folder / "letters.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"Name a letter ({i}).", "answer": "a"}) + "\n" for i in range(rows))
    )
    return ["task=jsonl", f"task.path={data}", "+task.answer_pattern='[a-z]'"]


def cfg_of(*overrides: str, recipe: str | None = "sharpen_sft", model: str | None = "tiny"):
    """The config `train` composes from the overrides, without running; the tiny sharpen_sft one unless
    recipe/model say otherwise (None: the config's own default)."""
    from selfimprove.compose import compose_config  # imported late: the environment above comes first
    from selfimprove.config import register

    register()
    head = [f"recipe={recipe}"] * bool(recipe) + [f"model={model}"] * bool(model)
    return compose_config([*head, *overrides])


def reset_accelerate() -> None:
    """accelerate keeps one state per process: an engine built after another (maybe bf16) starts fresh."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def run_loop(cfg) -> dict:
    """`selfimprove train` in this process, from a fresh accelerate state; pytest's signal handlers are
    given back after (the loop installs its preemption handlers)."""
    import signal

    from selfimprove.loop import run

    reset_accelerate()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return run(cfg)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


class EosAs:
    """The tokenizer with only its EOS id replaced."""

    def __init__(self, tokenizer, eos: int) -> None:
        self._tokenizer, self.eos_token_id = tokenizer, eos

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.fixture
def fresh_accelerator_state():
    """Use with `pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")`: each test's engine
    starts from a fresh accelerate state."""
    reset_accelerate()
    yield


def run_cli(
    args: list[str], *, env: dict | None = None, launcher: list[str] | None = None, check: bool = True
):
    cmd = (launcher or [sys.executable, "-m"]) + ["selfimprove", *args]
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def baseline_run(tmp_path_factory) -> Path:
    """One uninterrupted tiny run, shared by the resume and two-rank tests."""
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    run_cli(["train", *TINY, f"run.dir={run_dir}"])
    return run_dir


def torchrun(n: int) -> list[str]:
    """A `run_cli` launcher: torchrun with n CPU processes (gloo) on this machine."""
    return [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", str(n), "-m"]


@pytest.fixture(scope="session")
def two_rank_baseline(tmp_path_factory) -> Path:
    """The tiny run, uninterrupted, under torchrun with two CPU ranks: what the SLURM jobs and the
    preemption storm (two ranks too) must reproduce bit for bit."""
    run_dir = tmp_path_factory.mktemp("baseline2") / "run"
    run_cli(["train", *TINY, f"run.dir={run_dir}"], launcher=torchrun(2))
    return run_dir


@dataclass
class SlurmCluster:
    """The cluster scripts/ci/slurm.sh started: `env` points SLURM's clients at it."""

    dir: Path
    env: dict[str, str]

    def run(self, *cmd: str) -> str:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"{cmd}: {out.stderr}"
        return out.stdout


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    """A real SLURM (munged, slurmctld, slurmd) on this host for the session, stopped by pid at the end
    whatever the tests did. Where it cannot run (not root, no apt-get) the tests are skipped with the
    reason, except under CI=true, where that is a failure."""
    folder = tmp_path_factory.mktemp("slurm")
    script = ROOT / "scripts" / "ci" / "slurm.sh"
    started = subprocess.run(["bash", script, "start", folder], capture_output=True, text=True, timeout=900)
    try:
        if started.returncode == 77:
            reason = f"no SLURM here: {started.stderr.strip().splitlines()[-1]}"
            if os.environ.get("CI") == "true":
                pytest.fail(f"{reason} (CI=true: the SLURM tests must run)")
            pytest.skip(reason)
        assert started.returncode == 0, f"scripts/ci/slurm.sh start failed:\n{started.stderr}"
        # The jobs get this environment (sbatch exports it): none of an enclosing allocation's SLURM_*,
        # and no process group of this process's (an in-process test's MASTER_PORT would give every job
        # one rendezvous port, where a requeued job's old agent may still listen).
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "MASTER_"))
            and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
        }
        env["SLURM_CONF"] = str(folder / "slurm.conf")
        yield SlurmCluster(folder, env)
    finally:
        subprocess.run(["bash", script, "stop", folder], capture_output=True, timeout=120)


def kill_tree(pid: int) -> None:
    """SIGKILL to a launcher and every process under it: torchrun starts each rank in a session of its
    own, so killing the launcher's process group would leave the ranks hung (holding the pipes open)."""
    import psutil  # accelerate's dependency

    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in family:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def run_cli_within(
    seconds: float,
    args: list[str],
    *,
    env: dict | None = None,
    launcher: list[str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """`run_cli` that fails after `seconds` instead of waiting: a collective that never pairs up hangs
    every rank. Then the launcher and its ranks are killed, so none outlives the test."""
    cmd = (launcher or [sys.executable, "-m"]) + ["selfimprove", *args]
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
    try:
        out, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate(timeout=60)
        raise AssertionError(
            f"{cmd} still running after {seconds} s (hung):\n{out[-3000:]}\n{err[-5000:]}"
        ) from None
    finally:
        if proc.poll() is None:  # an error above (e.g. KeyboardInterrupt): no orphaned ranks
            kill_tree(proc.pid)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{out[-3000:]}\n{err[-5000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
