"""Atomic files and checkpoints.

A checkpoint is written into a temporary folder `.tmp-<name>` and renamed into place;
`checkpoints/latest` (a one-line file naming the folder) moves only after the rename. A folder is
complete when it holds journal.json and does not start with `.tmp-`; a folder is deleted journal
first, so a half-deleted one is never taken for complete. Resuming tries the checkpoint `latest`
names, then the other complete ones newest first, so a kill at any moment, or a file torn by a node
failure, costs at most the progress since the checkpoint before. Weights are safetensors;
optimizer/scheduler state is loaded with `weights_only=True`, so nothing a user could not trust is
unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from selfimprove import distributed as dist
from selfimprove import faults

SHARDS = "optimizer-shards"  # a folder of per-rank optimizer files (DeepSpeed's own checkpoint)


class CheckpointError(RuntimeError):
    """A run has checkpoints but none of them can be read."""


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def write_table(path: Path, rows: list[dict]) -> None:
    """A list of records as a Parquet file, atomically (temp file + rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)


def read_table(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def save(
    run_dir: Path,
    name: str,
    *,
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ema_state: dict[str, torch.Tensor] | None,
    journal: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Collective: every rank calls it; rank 0 writes the state. No RNG state is saved: every unit of
    work seeds its own generator from the run's seed (`dist.derive_seed`), so none is needed to resume.

    `optimizer.state_dict()` runs on every rank (gathering a sharded optimizer is collective); None
    means the optimizer writes its own per-rank shards instead (DeepSpeed: `write_shards(folder)`)."""
    root = run_dir / "checkpoints"
    tmp = root / f".tmp-{name}"
    optimizer_state = optimizer.state_dict()
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "model.safetensors")
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if ema_state is not None:
            save_file(ema_state, tmp / "ema.safetensors")
        write_json(tmp / "journal.json", journal)
    dist.barrier()
    if optimizer_state is None:
        optimizer.write_shards(tmp / SHARDS)
    dist.barrier()
    faults.point(f"checkpoint:{name}")
    if dist.is_main():
        _publish(root, name, keep)
    dist.barrier()
    return root / name


def _publish(root: Path, name: str, keep: int) -> None:
    """Renames `.tmp-<name>` into place, moves `latest`, prunes. A name can repeat (a resumed run
    saving the same round and step again): the old folder is moved aside to `.old-<name>`, not
    deleted, so between any two steps the newest complete checkpoint is `latest`'s or a candidate."""
    final, aside = root / name, root / f".old-{name}"
    if final.exists():
        _remove(aside)  # left by an earlier kill: `final` is newer than it
        os.replace(final, aside)
    os.replace(root / f".tmp-{name}", final)
    (root / ".latest.tmp").write_text(name)
    os.replace(root / ".latest.tmp", root / "latest")
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("."):
            _remove(p)  # left by killed saves; `latest` now names a newer complete checkpoint
    complete = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for p in complete[:-keep]:  # names sort by round, then step
        if p.name != name:
            _remove(p)


def _remove(path: Path) -> None:
    (path / "journal.json").unlink(missing_ok=True)  # first: a half-deleted folder is not complete
    shutil.rmtree(path, ignore_errors=True)


def candidates(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders to resume from, best first: the one `latest` names, then the
    others newest first by their journal's (round, global_step). `.old-<name>` folders count: a save
    killed after moving its predecessor aside leaves the newest complete copy there."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".tmp-") and (p / "journal.json").exists()
    ]
    found.sort(key=_recency, reverse=True)
    pointer = root / "latest"
    named = root / pointer.read_text().strip() if pointer.exists() else None
    return sorted(found, key=lambda p: p != named)  # stable: keeps the recency order after it


def _recency(path: Path) -> tuple[int, ...]:
    try:
        j = json.loads((path / "journal.json").read_text())
        return (
            int(j.get("round", 0)),
            int(j.get("global_step", 0)),
            int(j.get("phase") == "evaluate"),  # an update finished beats one preempted at the same step
            int(j.get("update_step", 0)),
            int(not path.name.startswith(".")),  # the renamed-in copy beats the one moved aside
        )
    except Exception:  # unreadable: tried last, and reported then
        return (-1,)


def latest(run_dir: Path) -> Path | None:
    """The best complete checkpoint folder (not read; `load_latest` falls back on a damaged one)."""
    found = candidates(run_dir)
    return found[0] if found else None


def load_latest(
    run_dir: Path, *, optimizer: torch.optim.Optimizer | None, scheduler: Any | None
) -> tuple[Path, dict[str, Any]] | None:
    """Collective. Restores the newest readable checkpoint: every file of a candidate is read before
    anything is applied, and every rank takes the same one. Restores optimizer and scheduler in place
    (neither with optimizer=None, e.g. for evaluation; an older checkpoint's rng-rank*.pt is ignored);
    returns (folder, {"weights", "ema", "journal"}), None when the run has no checkpoint, and raises
    CheckpointError when it has some but none is readable (starting over would reuse rounds/ of lost
    weights)."""
    failed: list[str] = []
    for path in candidates(run_dir):
        try:
            state, error = _read(path, training=optimizer is not None), None
        except CheckpointError as e:
            state, error = None, str(e)
        if dist.all_sum([float(state is None)])[0] > 0:
            failed.append(f"{path.name} ({error or 'unreadable on another rank'})")
            continue
        if optimizer is not None:
            _apply(state, optimizer, scheduler)
        if failed and dist.is_main():
            s = "s" if len(failed) > 1 else ""
            print(f"[selfimprove] unreadable checkpoint{s} {'; '.join(failed)}; resuming from {path.name}")
        return path, {k: state[k] for k in ("weights", "ema", "journal")}
    if failed:
        raise CheckpointError(f"no readable checkpoint in {run_dir / 'checkpoints'}: {'; '.join(failed)}")
    return None


def _read(path: Path, *, training: bool) -> dict[str, Any]:
    """Every file of a checkpoint, fully, into memory; the journal last (the file a test tears)."""
    ema = path / "ema.safetensors"
    state: dict[str, Any] = {
        "weights": _read_file(path / "model.safetensors", load_file),
        "ema": _read_file(ema, load_file) if ema.exists() else None,
    }
    if training:
        # a sharded optimizer's files are read by the optimizer itself (DeepSpeed's load_checkpoint)
        sharded = (path / SHARDS).is_dir()
        state["optimizer"] = None if sharded else _read_file(path / "optimizer.pt", _torch_load)
        state["scheduler"] = _read_file(path / "scheduler.pt", _torch_load)
    state["journal"] = _read_file(path / "journal.json", lambda f: json.loads(f.read_text()))
    if not isinstance(state["journal"], dict):
        raise CheckpointError("journal.json: not a JSON object")
    return state


def _torch_load(file: Path) -> Any:
    return torch.load(file, weights_only=True)


def _read_file(file: Path, reader: Callable[[Path], Any]) -> Any:
    try:
        return reader(file)
    except Exception as e:  # torn, missing or corrupt: whatever the reader raises
        why = (str(e).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{file.name}: {type(e).__name__}: {why}") from e


def _apply(state: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    if state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
