"""Fault injection for the resume tests: `SELFIMPROVE_CRASH_AT=point` kills the process with SIGKILL
(no cleanup, like a node failure) when execution reaches that point; `SELFIMPROVE_SIGTERM_AT=a,b`
sends it SIGTERM (SLURM preemption) at each listed point. Points look like `sample:r1:u2` (after unit 2
of round 1 is written), `verify:r1:u0`, `eval:r1:u0`, `update:r2:s1`, `phase:r1:select`,
`checkpoint:r0001-s000003` (inside a checkpoint write, before the rename)."""

from __future__ import annotations

import os
import signal

from selfimprove import distributed as dist


def point(name: str) -> None:
    target = os.environ.get("SELFIMPROVE_CRASH_AT")
    if target and target == name and dist.rank() == int(os.environ.get("SELFIMPROVE_CRASH_RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    if name in os.environ.get("SELFIMPROVE_SIGTERM_AT", "").split(","):
        os.kill(os.getpid(), signal.SIGTERM)


def nan_here(name: str) -> bool:
    """`SELFIMPROVE_NAN_AT=update:r1:s2` makes that optimizer step's loss NaN (the NaN-guard test)."""
    return os.environ.get("SELFIMPROVE_NAN_AT") == name
