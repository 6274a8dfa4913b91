"""Fault injection for the resume tests: `SELFIMPROVE_CRASH_AT=point` kills the process with SIGKILL
(no cleanup, like a node failure) when execution reaches that point; `SELFIMPROVE_SIGTERM_AT=a,b`
sends it SIGTERM (SLURM preemption) at each listed point; `SELFIMPROVE_HOLD_AT=a,b` waits at each
listed point once, so a test can preempt from outside at a known moment (see `_hold`);
`SELFIMPROVE_TRACE=file` appends the name of every point rank 0 passes to file. Points look like
`sample:r1:u2` (after unit 2 of round 1 is written), `verify:r1:u0`, `eval:r1:u0`, `update:r2:s1`,
`phase:r1:select`, `checkpoint:r0001-s000003` (inside a checkpoint write, before the rename)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from selfimprove import distributed as dist


def point(name: str) -> None:
    trace = os.environ.get("SELFIMPROVE_TRACE")
    if trace and dist.rank() == 0:  # one line per point passed: the storm test times its kills by it
        with open(trace, "a") as f:
            f.write(name + "\n")
    target = os.environ.get("SELFIMPROVE_CRASH_AT")
    if target and target == name and dist.rank() == int(os.environ.get("SELFIMPROVE_CRASH_RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    if name in os.environ.get("SELFIMPROVE_SIGTERM_AT", "").split(","):
        os.kill(os.getpid(), signal.SIGTERM)
    if name in os.environ.get("SELFIMPROVE_HOLD_AT", "").split(",") and dist.rank() == 0:
        _hold(name)


def _hold(name: str) -> None:
    """Rank 0 (the one that writes checkpoints) creates `$SELFIMPROVE_HOLD_DIR/<name>` and waits there up
    to `SELFIMPROVE_HOLD_S` seconds (default 60): the test sees the file and preempts the job (scancel,
    scontrol requeue) while the run is at that point; the other ranks wait at their next collective. A stop signal ends the wait, except inside a
    checkpoint write, which signals do not interrupt: there the SIGKILL after SLURM's KillWait lands.
    The file stays, so a resumed run passes the point without waiting again."""
    marker = Path(os.environ["SELFIMPROVE_HOLD_DIR"]) / name.replace(":", "_")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    from selfimprove.loop import _stop  # late: the loop imports this module

    deadline = time.monotonic() + float(os.environ.get("SELFIMPROVE_HOLD_S", "60"))
    while time.monotonic() < deadline:
        if _stop["requested"] and not name.startswith("checkpoint:"):
            return
        time.sleep(0.05)


def nan_here(name: str) -> bool:
    """`SELFIMPROVE_NAN_AT=update:r1:s2` makes that optimizer step's loss NaN (the NaN-guard test)."""
    return os.environ.get("SELFIMPROVE_NAN_AT") == name
