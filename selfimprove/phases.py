"""The work inside each phase, as units written to disk: sampling, scoring and evaluation.

A unit is a fixed chunk of prompts with its own seed; its output is one Parquet shard. A rank only
computes the units it owns (u % world == rank) and skips shards already on disk, so a killed run
resumes without losing or repeating a sample, and resumes on any number of ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from selfimprove import distributed as dist
from selfimprove import faults
from selfimprove.checkpoint import read_table, write_table
from selfimprove.logging import progress
from selfimprove.rollout import OneTurn
from selfimprove.stages import Context, order_stages

Timer = dict[str, float]


def units(n_prompts: int, n: int, batch_size: int) -> list[range]:
    """The prompts of each unit: whole prompts, about batch_size sequences (n per prompt) each."""
    per = max(1, batch_size // max(n, 1))
    return [range(s, min(s + per, n_prompts)) for s in range(0, n_prompts, per)]


def generation_options(sampler) -> dict:
    """What `generate` takes from the `sampler` config group."""
    return dict(max_new_tokens=sampler.max_new_tokens, temperature=sampler.temperature, top_p=sampler.top_p)


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
    *,
    engine,
    task,
    n: int,
    batch_size: int,
    gen: dict,
    seed_of_unit: Callable[[int], int],
    timer: Timer,
    should_stop: Callable[[], bool],
    desc: str,
    fault: str = "",
    rollout: OneTurn | None = None,
) -> list[dict] | None:
    """Rolls out n episodes per problem (`rollout`: one turn by default, or two attempts), unit by unit.
    Returns all rows, or None if stopped."""
    rollout = rollout or OneTurn()
    chunks = units(len(problems), n, batch_size)
    bar = progress(len(chunks), desc)
    for u in _my_waves(len(chunks)):
        if u is not None and not _shard(folder, u).exists():
            chunk = [problems[i] for i in chunks[u]]
            t = time.perf_counter()
            rows = rollout(engine, task, chunk, n, gen, seed_of_unit(u))
            timer["generate"] = timer.get("generate", 0.0) + time.perf_counter() - t
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
    n_units: int,
    *,
    scorers: list,
    context_of_unit: Callable[[int], Context],
    should_stop: Callable[[], bool],
    fault: str = "",
) -> list[dict] | None:
    """Runs the scorers (stages, in `order_stages` order) on each unit: all samples of a prompt share
    a unit, so per-prompt scorers see whole groups. Returns all scored rows, or None if stopped."""
    scorers = order_stages(scorers)
    for u in _my_waves(n_units):
        if u is not None and not _shard(dst, u).exists():
            rows = read_table(_shard(src, u))
            ctx = context_of_unit(u)
            for scorer in scorers:
                rows = scorer(rows, ctx)
            write_table(_shard(dst, u), rows)
            faults.point(f"{fault}:u{u}")
        if should_stop():
            return None
    return gather(dst, n_units)


def n_units(n_prompts: int, n: int, batch_size: int) -> int:
    return len(units(n_prompts, n, batch_size))
