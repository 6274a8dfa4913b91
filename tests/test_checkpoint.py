"""Checkpoints survive a kill between any two file-system steps, and a damaged newest checkpoint
falls back to the one before it, with real files of a tiny model, AdamW and a transformers scheduler."""

import contextlib
import json
import os
import random
from pathlib import Path

import pytest
import torch
from transformers import get_scheduler

from selfimprove import checkpoint


class Killed(Exception):
    """Stands in for SIGKILL: nothing after it runs."""


def trained(seed: int, steps: int = 1):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = get_scheduler("constant", opt)
    for _ in range(steps):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def fresh():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, get_scheduler("constant", opt)


def save(run_dir: Path, name: str, seed: int, journal: dict, keep: int = 2) -> None:
    model, opt, sched = trained(seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    checkpoint.save(
        run_dir,
        name,
        weights=state,
        optimizer=opt,
        scheduler=sched,
        ema_state={k: v * 0.5 for k, v in state.items()},
        journal=journal,
        keep=keep,
    )


@contextlib.contextmanager
def killed_after(n: int):
    """Every file-system mutation (rename, replace, unlink, rmdir, also inside shutil.rmtree) counts
    as a step; the n-th and all later ones raise, as if the process died just before it."""
    count = {"n": 0, "dead": False}
    originals = {name: getattr(os, name) for name in ("replace", "rename", "unlink", "rmdir")}

    def wrap(fn):
        def step(*args, **kwargs):
            if count["n"] >= n:
                count["dead"] = True
                raise Killed
            count["n"] += 1
            return fn(*args, **kwargs)

        return step

    try:
        for name, fn in originals.items():
            setattr(os, name, wrap(fn))
        yield count
    finally:
        for name, fn in originals.items():
            setattr(os, name, fn)


OLD = {"round": 2, "global_step": 6, "phase": "update", "update_step": 3}
NEW = {"round": 2, "global_step": 6, "phase": "evaluate", "update_step": 0}


def test_repeated_name_survives_a_kill_between_any_two_steps(tmp_path):
    """A preempted run saves r0002-s000006 mid-update; resumed, it saves the same name again. A kill
    anywhere in that second save must leave the old or the new r0002 findable, never round 0."""
    for n in range(200):
        run_dir = tmp_path / f"kill{n}"
        save(run_dir, "r0001-s000003", 1, {"round": 1, "global_step": 3, "phase": "evaluate"})
        save(run_dir, "r0002-s000006", 2, OLD)
        with killed_after(n) as count:
            with contextlib.suppress(Killed):
                save(run_dir, "r0002-s000006", 3, NEW)
        found = checkpoint.latest(run_dir)
        assert found is not None, f"killed after {n} steps: `latest` names nothing"
        assert json.loads((found / "journal.json").read_text()) in (OLD, NEW), n
        path, state = checkpoint.load_latest(run_dir, optimizer=fresh()[1], scheduler=fresh()[2])
        assert state["journal"] in (OLD, NEW), n

        # the next save of the same name (the resumed run's) completes and cleans up after the kill
        save(run_dir, "r0002-s000006", 4, {**NEW, "again": True})
        assert json.loads((checkpoint.latest(run_dir) / "journal.json").read_text())["again"]
        left = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        assert left == ["latest", "r0001-s000003", "r0002-s000006"], (n, left)
        if not count["dead"]:
            break  # the save finished: every step has been a kill point
    else:
        pytest.fail("the save never finished")
    assert n > 3  # the sweep did cover several steps


@pytest.mark.parametrize(
    "damaged", ["model.safetensors", "optimizer.pt", "scheduler.pt", "ema.safetensors", "journal.json"]
)
def test_truncated_newest_checkpoint_falls_back(tmp_path, capsys, damaged):
    run_dir = tmp_path / "run"
    for r in (1, 2, 3):
        save(run_dir, f"r{r:04d}-s{3 * r:06d}", r, {"round": r, "global_step": 3 * r}, keep=3)
    newest = run_dir / "checkpoints" / "r0003-s000009"
    data = (newest / damaged).read_bytes()
    (newest / damaged).write_bytes(data[: len(data) // 2])  # a torn write
    capsys.readouterr()

    model, opt, sched = fresh()
    path, state = checkpoint.load_latest(run_dir, optimizer=opt, scheduler=sched)

    assert path.name == "r0002-s000006"  # the newest readable one, by the journal's (round, step)
    assert state["journal"] == {"round": 2, "global_step": 6}
    want_model, want_opt, _ = trained(2)
    for k, v in want_model.state_dict().items():
        assert torch.equal(state["weights"][k], v)
        assert torch.equal(state["ema"][k], v * 0.5)
    for p, q in zip(opt.state.values(), want_opt.state.values()):
        assert torch.equal(p["exp_avg"], q["exp_avg"])
    lines = [x for x in capsys.readouterr().out.splitlines() if x]
    assert len(lines) == 1, lines
    assert "r0003-s000009" in lines[0] and damaged in lines[0] and "r0002-s000006" in lines[0]


def test_unreadable_checkpoints_change_nothing_and_refuse(tmp_path):
    """Every file of a candidate is read before anything is applied: a half-read candidate leaves
    the optimizer, scheduler and RNG as they were; with no readable one left, resuming is refused
    (starting over would reuse rounds/ sampled by the lost weights)."""
    run_dir = tmp_path / "run"
    save(run_dir, "r0001-s000003", 1, {"round": 1, "global_step": 3})
    ckpt = run_dir / "checkpoints" / "r0001-s000003"
    (ckpt / "journal.json").write_text('{"round": 1, "glo')  # the last file read

    model, opt, sched = fresh()
    opt_before, sched_before = json.dumps(str(opt.state_dict())), sched.state_dict()
    random.seed(123)
    torch.manual_seed(123)
    rng_before = (random.getstate(), torch.get_rng_state())
    with pytest.raises(checkpoint.CheckpointError, match="r0001-s000003"):
        checkpoint.load_latest(run_dir, optimizer=opt, scheduler=sched)
    assert json.dumps(str(opt.state_dict())) == opt_before and sched.state_dict() == sched_before
    assert random.getstate() == rng_before[0] and torch.equal(torch.get_rng_state(), rng_before[1])


def test_no_checkpoint_is_none(tmp_path):
    _, opt, sched = fresh()
    assert checkpoint.load_latest(tmp_path, optimizer=opt, scheduler=sched) is None
    assert checkpoint.latest(tmp_path) is None


def test_old_checkpoint_with_rng_state_loads(tmp_path):
    """Checkpoints no longer hold the RNG (every unit seeds itself); an older one's rng-rank0.pt is
    ignored, and the global RNG is left as it was."""
    run_dir = tmp_path / "run"
    save(run_dir, "r0001-s000003", 1, {"round": 1, "global_step": 3})
    ckpt = run_dir / "checkpoints" / "r0001-s000003"
    assert not list(ckpt.glob("rng-rank*.pt"))
    torch.save({"torch": torch.get_rng_state(), "python": repr(random.getstate())}, ckpt / "rng-rank0.pt")
    _, opt, sched = fresh()
    torch.manual_seed(7)
    before = torch.get_rng_state()
    path, state = checkpoint.load_latest(run_dir, optimizer=opt, scheduler=sched)
    assert path == ckpt and state["journal"]["global_step"] == 3
    assert torch.equal(torch.get_rng_state(), before)
