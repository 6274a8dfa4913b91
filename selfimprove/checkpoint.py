"""Atomic files and checkpoints.

A checkpoint is written into a temporary folder and renamed into place; `checkpoints/latest` (a
one-line file naming the folder) moves only after the rename, so a kill at any moment leaves
`latest` naming a complete checkpoint. Weights are safetensors; optimizer/scheduler state is loaded
with `weights_only=True`, so nothing a user could not trust is unpickled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from selfimprove import distributed as dist
from selfimprove import faults


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


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


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
    """Collective: every rank calls it; rank 0 writes the shared state, each rank its RNG."""
    root = run_dir / "checkpoints"
    final = root / name
    tmp = root / f".tmp-{name}"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if ema_state is not None:
            save_file(ema_state, tmp / "ema.safetensors")
        write_json(tmp / "journal.json", journal)
    dist.barrier()
    rng = _rng_state()
    rng["python"] = repr(rng["python"])  # a plain tuple of ints: saved as text, not pickled
    rng["numpy"] = {"state": torch.from_numpy(rng["numpy"][1].astype(np.int64)), "pos": rng["numpy"][2]}
    torch.save(rng, tmp / f"rng-rank{dist.rank()}.pt")
    dist.barrier()
    faults.point(f"checkpoint:{name}")
    if dist.is_main():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (root / ".latest.tmp").write_text(name)
        os.replace(root / ".latest.tmp", root / "latest")
        for old in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))[:-keep]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def latest(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "journal.json").exists() else None


def load(path: Path, *, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restores optimizer/scheduler/RNG in place; returns weights, EMA state and the journal."""
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng-rank{dist.rank()}.pt"
    if rng_file.exists():  # absent when resuming on more ranks than were saved
        import ast

        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(ast.literal_eval(rng["python"]))
        np.random.set_state(("MT19937", rng["numpy"]["state"].numpy().astype(np.uint32), rng["numpy"]["pos"]))
    ema_file = path / "ema.safetensors"
    return {
        "weights": load_file(path / "model.safetensors"),
        "ema": load_file(ema_file) if ema_file.exists() else None,
        "journal": json.loads((path / "journal.json").read_text()),
    }
