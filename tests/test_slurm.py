"""The batch scripts of scripts/slurm/ on a real SLURM (scripts/ci/slurm.sh: slurmctld and slurmd on
this host), with the tiny recipe on CPU processes (gloo): a job runs to the end, is preempted with and
without warning, requeues itself and resumes bit-identically, and fails without requeueing on bad input.

The scripts ask for 8 GPUs and 64 CPUs per node; the jobs override that on the sbatch command line as a
user of a small cluster would (--gpus-per-node=0 --cpus-per-task=...) and set GPUS_PER_NODE. A
requeued job waits AuthInfo's cred_expire + 1 seconds before it starts again: 6 s on the test cluster
(scripts/ci/slurm.sh), 121 s by default."""

import hashlib
import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT, TINY, SlurmCluster, assert_same_final_state, assert_same_samples

# One worker runs these one after another: they share one cluster (a session fixture); a second worker
# would start a second cluster, whose job ids, and so rendezvous ports, repeat the first's.
pytestmark = pytest.mark.xdist_group("slurm")

SMALL_NODE = ["--gpus-per-node=0", "--cpus-per-task=2"]  # the "debug" partition: one node, 2 CPUs
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class Job:
    def __init__(self, cluster: SlurmCluster, folder: Path, script: str, args: list[str], **opts) -> None:
        """sbatch scripts/slurm/<script> from the repository root, its log in folder/job-<id>.out;
        opts: `sbatch` (its options), `env` (exported to the job), `hold` (points the run waits at,
        once each, for the test to preempt it there: selfimprove/faults.py)."""
        self.cluster, self.folder = cluster, folder
        self.holds = folder / "holds"
        self.holds.mkdir(parents=True, exist_ok=True)
        env = {
            **cluster.env,
            "GPUS_PER_NODE": "2",
            "RUN_DIR": str(folder / "run"),
            "SELFIMPROVE_HOLD_AT": ",".join(opts.get("hold", [])),
            "SELFIMPROVE_HOLD_DIR": str(self.holds),
            **opts.get("env", {}),
        }
        cmd = ["sbatch", "--parsable", f"--output={folder}/job-%j.out", *opts.get("sbatch", SMALL_NODE)]
        out = subprocess.run(
            [*cmd, f"scripts/slurm/{script}", *args], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        self.id = out.stdout.strip().split(";")[0]
        self.run_dir = folder / "run"

    def info(self) -> dict[str, str]:
        return dict(re.findall(r"(\w+)=(\S*)", self.cluster.run("scontrol", "show", "job", "-o", self.id)))

    def log(self) -> str:
        path = self.folder / f"job-{self.id}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, what: str, ready: Callable[[dict], bool], timeout: float = 180) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.info()
            if ready(info):
                return info
            assert time.monotonic() < deadline, (
                f"job {self.id}: no {what} in {timeout} s: {info}\n{self.log()}"
            )
            time.sleep(0.2)

    def done(self) -> dict[str, str]:
        return self.wait("end", lambda i: i["JobState"] in DONE)

    def at(self, point: str) -> None:
        """Waits until the run holds at `point` (it is there, and waits)."""
        marker = self.holds / point.replace(":", "_")
        self.wait(f"hold at {point}", lambda i: marker.exists() or i["JobState"] in DONE, timeout=120)
        assert marker.exists(), f"job {self.id} ended before {point}:\n{self.log()}"

    def requeued(self, restarts: int) -> None:
        """Waits until the job is back in the queue for the `restarts`-th time (or already runs again)."""
        self.wait(
            "requeue", lambda i: i["JobState"] in ("PENDING", "RUNNING") and int(i["Restarts"]) >= restarts
        )


def assert_same_run(run_dir: Path, baseline: Path) -> None:
    """Weights and EMA bit-identical, every sample once and the same, every step and evaluation logged once."""
    assert_same_final_state(run_dir, baseline)
    assert_same_samples(run_dir, baseline, range(1, 3))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == list(range(1, 7))
    assert [x["round"] for x in lines if "eval/accuracy" in x] == [0, 1, 2]


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_one_node_job_runs_to_the_end(slurm_cluster, two_rank_baseline, tmp_path):
    job = Job(slurm_cluster, tmp_path, "one_node.sbatch", TINY)
    info = job.done()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), job.log()
    assert_same_run(job.run_dir, two_rank_baseline)


def test_usr1_warning_checkpoints_requeues_and_resumes(slurm_cluster, two_rank_baseline, tmp_path):
    # SLURM's warning signal (--signal=B:USR1@120) reaches the batch shell only; the script forwards it
    # to the workers (pkill -f), which checkpoint after the step they are in and exit 0.
    job = Job(slurm_cluster, tmp_path, "one_node.sbatch", TINY, hold=["update:r1:s1"])
    job.at("update:r1:s1")
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job.id)
    job.requeued(1)
    info = job.done()
    log = job.log()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "[slurm] got SIGUSR1" in log and log.count("stopped by signal") == 1
    assert f"loaded {job.run_dir}/checkpoints/r0001-s000001" in log  # the preemption's checkpoint
    assert_same_run(job.run_dir, two_rank_baseline)


def test_requeue_without_warning_at_several_moments(slurm_cluster, two_rank_baseline, tmp_path):
    # `scontrol requeue` is a preemption without warning: SIGTERM to every process of the job, SIGKILL
    # KillWait (10 s) later. In sampling, the update and evaluation the workers stop in time; inside a
    # checkpoint write they do not (a write is not interrupted), so SIGKILL lands there.
    moments = ["sample:r1:u0", "update:r1:s2", "eval:r1:u0", "checkpoint:r0002-s000006"]
    job = Job(slurm_cluster, tmp_path, "one_node.sbatch", TINY, hold=moments)
    for n, moment in enumerate(moments, 1):
        job.at(moment)
        slurm_cluster.run("scontrol", "requeue", job.id)
        job.requeued(n)
    info = job.done()
    log = job.log()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "4"), log
    assert log.count("stopped by signal") >= 3
    # killed inside the write of r0002-s000006: the next attempt resumed from round 1's checkpoint
    assert log.rsplit("JOB REQUEUE", 1)[1].count(f"loaded {job.run_dir}/checkpoints/r0001-s000003") == 1
    assert not [p for p in (job.run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert_same_run(job.run_dir, two_rank_baseline)


def test_failed_step_exits_nonzero_and_is_not_requeued(slurm_cluster, tmp_path):
    job = Job(slurm_cluster, tmp_path, "one_node.sbatch", [*TINY, "trainer.no_such_option=1"])
    info = job.done()
    log = job.log()
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0" and info["Restarts"] == "0", log
    assert "no_such_option" in log and "[slurm] training step failed" in log


def test_multi_node_script_on_two_nodes_with_a_usr1_preemption(slurm_cluster, two_rank_baseline, tmp_path):
    # The "multi" partition: two slurmd nodes on this host, one torchrun each (one process), a c10d
    # rendezvous. Node names are not in DNS here, so MASTER_ADDR is given; one thread per process as
    # torchrun sets for several local processes, so the arithmetic is the one-node run's.
    job = Job(
        slurm_cluster,
        tmp_path,
        "multi_node.sbatch",
        TINY,
        sbatch=["--partition=multi", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1"],
        env={"GPUS_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"},
        hold=["update:r1:s2"],
    )
    job.at("update:r1:s2")
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job.id)
    job.requeued(1)
    info = job.done()
    log = job.log()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert info["NumNodes"] == "2" and log.count("stopped by signal") == 1
    assert_same_run(job.run_dir, two_rank_baseline)


# ----- bad input: one clear line in the job's output, exit non-zero, nothing of an earlier run overwritten


def test_no_gpus_and_no_gpus_per_node(slurm_cluster, tmp_path):
    job = Job(slurm_cluster, tmp_path, "one_node.sbatch", TINY, env={"GPUS_PER_NODE": ""})
    info = job.done()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0"
    assert job.log().strip().splitlines() == [
        "[slurm] no GPUs on this node (SLURM_GPUS_ON_NODE=''): request them with --gpus-per-node, "
        "or set GPUS_PER_NODE (processes per node)"
    ]
    assert not job.run_dir.exists()


def test_run_dir_of_another_recipe(slurm_cluster, two_rank_baseline, tmp_path):
    import shutil

    job_dir = tmp_path / "job"
    shutil.copytree(two_rank_baseline, job_dir / "run")
    before = snapshot(job_dir / "run")
    other = ["recipe=oracle_sft", *TINY[1:]]
    job = Job(slurm_cluster, job_dir, "one_node.sbatch", other)
    info = job.done()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0"
    assert f"{job.run_dir} holds a run of recipe 'sharpen_sft', not 'oracle_sft'" in job.log()
    assert snapshot(job.run_dir) == before


def test_requeued_job_whose_config_changed(slurm_cluster, tmp_path):
    # The user's recipe is edited while the job is preempted: the requeued job refuses to resume.
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    mine = recipes / "mine.yaml"
    mine.write_text("# @package _global_\ndefaults: [sharpen_sft, _self_]\nrecipe: mine\n")
    args = ["--recipes", str(recipes), "recipe=mine", *TINY[1:]]
    job = Job(slurm_cluster, tmp_path / "job", "one_node.sbatch", args, hold=["update:r1:s1"])
    job.at("update:r1:s1")
    slurm_cluster.run("scontrol", "requeuehold", job.id)  # requeued, and held until released
    job.wait("requeue", lambda i: i["JobState"] == "PENDING" and i["Restarts"] == "1")
    mine.write_text(mine.read_text() + "trainer: {lr: 5e-4}\n")
    before = snapshot(job.run_dir)
    slurm_cluster.run("scontrol", "release", job.id)
    info = job.done()
    log = job.log()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", log
    assert (
        "resume=auto refused, the config changed incompatibly" in log
        and "trainer.lr: 0.0003 -> 0.0005" in log
    )
    assert snapshot(job.run_dir) == before
