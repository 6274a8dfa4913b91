"""The work inside each phase, as units written to disk: sampling, scoring and evaluation.

A unit is a fixed chunk of prompts with its own seed; its output is one Parquet shard. A rank only
computes the units it owns (u % world == rank) and skips shards already on disk, so a killed run
resumes without losing or repeating a sample, and resumes on any number of ranks.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

from selfimprove import distributed as dist
from selfimprove import faults
from selfimprove.checkpoint import read_table, write_json, write_table
from selfimprove.logging import progress
from selfimprove.rollout import OneTurn
from selfimprove.stages import Context


def units(n_prompts: int, n: int, batch_size: int) -> list[range]:
    """The prompts of each unit: whole prompts, about batch_size sequences (n per prompt) each."""
    per = max(1, batch_size // max(n, 1))
    return [range(s, min(s + per, n_prompts)) for s in range(0, n_prompts, per)]


def generation_options(sampler) -> dict:
    """What `generate` takes from the `sampler` config group: the length, every sampling option of
    `decode.WARPERS`, and the backtracking settings where backtracking is on (the rollout builds the
    verifier from them)."""
    from selfimprove.config import BacktrackConfig
    from selfimprove.sampling.decode import WARPERS

    options = dict(max_new_tokens=sampler.max_new_tokens, **{k: sampler[k] for k in WARPERS if k in sampler})
    if "backtrack" in sampler and sampler.backtrack.quota > 0:
        options["backtrack"] = BacktrackConfig(**sampler.backtrack)
    return options


def _shard(folder: Path, unit: int) -> Path:
    return folder / f"unit-{unit:05d}.parquet"


def gather(folder: Path, n_units: int) -> list[dict]:
    """Every rank reads every shard, in unit order: the same table on every rank."""
    dist.barrier()
    rows: list[dict] = []
    for u in range(n_units):
        rows.extend(read_table(_shard(folder, u)))
    return rows


def _my_waves(n_units: int) -> list[int | None]:
    """This rank's unit in each wave of `world` units (None past the end). Every rank walks the same
    number of waves, so the collective stop check after each wave pairs up across ranks whatever the
    split of units and whatever shards a crash left behind."""
    world = dist.world()
    return [w + dist.rank() if w + dist.rank() < n_units else None for w in range(0, n_units, world)]


def sample_units(
    folder: Path,
    problems: list,
    rollout: OneTurn,
    n: int,
    gen: dict,
    *,
    context_of_unit: Callable[[int], Context],
    should_stop: Callable[[], bool],
    desc: str,
    fault: str = "",
) -> list[dict] | None:
    """Rolls out n episodes per problem (one turn, or two attempts), unit by unit, each with its own
    context (seed, and the timer generation is counted in). Returns all rows, or None if stopped."""
    chunks = units(len(problems), n, context_of_unit(0).batch_size)
    bar = progress(len(chunks), desc)
    for u in _my_waves(len(chunks)):
        if u is not None and not _shard(folder, u).exists():
            rows = rollout(context_of_unit(u), [problems[i] for i in chunks[u]], n, gen)
            write_table(_shard(folder, u), rows)
            faults.point(f"{fault}:u{u}")
        bar.update(min(dist.world(), len(chunks) - bar.n))
        if should_stop():
            bar.close()
            return None
    bar.close()
    return gather(folder, len(chunks))


def verify_units(
    src: Path,
    dst: Path,
    *,
    scorers: list,
    context_of_unit: Callable[[int], Context],
    should_stop: Callable[[], bool],
    fault: str = "",
) -> tuple[list[dict], dict] | None:
    """Runs the scorers (already in `order_stages` order) on each unit: all samples of a prompt share a
    unit, so per-prompt scorers see whole groups. Returns all scored rows and what the scorers logged
    (`logged_mean`), or None if stopped. The units are sampling's, read from `src` (complete: sampling
    gathered them)."""
    n_units = len(list(src.glob("unit-*.parquet")))
    for u in _my_waves(n_units):
        if u is not None and not _shard(dst, u).exists():
            rows = read_table(_shard(src, u))
            ctx = context_of_unit(u)
            for scorer in scorers:
                rows = scorer(rows, ctx)
            if ctx.logged:  # before the shard, whose existence marks the unit done
                dst.mkdir(parents=True, exist_ok=True)
                write_json(_logged(dst, u), ctx.logged)
            write_table(_shard(dst, u), rows)
            faults.point(f"{fault}:u{u}")
        if should_stop():
            return None
    return gather(dst, n_units), logged_mean(dst, n_units)


def _logged(folder: Path, unit: int) -> Path:
    return folder / f"unit-{unit:05d}.logged.json"


def logged_mean(folder: Path, n_units: int) -> dict[str, float]:
    """What stages logged per unit, as the mean over the units that logged each name (None skipped).
    Units are fixed by the config, not by the ranks, so this is the same on any number of ranks and
    after any resume. (After `gather`'s barrier every unit's file is on disk.)"""
    values: dict[str, list[float]] = {}
    for u in range(n_units):
        if _logged(folder, u).exists():
            for name, value in json.loads(_logged(folder, u).read_text()).items():
                if value is not None:
                    values.setdefault(name, []).append(value)
    return {name: statistics.fmean(v) for name, v in values.items()}
