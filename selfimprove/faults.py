"""Fault injection for the resume tests: `SELFIMPROVE_CRASH_AT=point` kills the process with SIGKILL
(no cleanup, like a node failure) when execution reaches that point. Points look like
`sample:r1:u2` (after unit 2 of round 1 is written), `update:r2:s1`, `phase:r1:select`,
`checkpoint:r1` (inside a checkpoint write, before the rename)."""

from __future__ import annotations

import os
import signal

from selfimprove import distributed as dist


def point(name: str) -> None:
    target = os.environ.get("SELFIMPROVE_CRASH_AT")
    if target and target == name and dist.rank() == int(os.environ.get("SELFIMPROVE_CRASH_RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
