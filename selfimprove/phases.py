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
from selfimprove.sampling import HFSampler, sequence_logprobs

Timer = dict[str, float]


def _units(n_prompts: int, n: int, batch_size: int) -> list[range]:
    per = max(1, batch_size // max(n, 1))
    return [range(s, min(s + per, n_prompts)) for s in range(0, n_prompts, per)]


def _shard(folder: Path, unit: int) -> Path:
    return folder / f"unit-{unit:05d}.parquet"


def gather(folder: Path, n_units: int) -> list[dict]:
    """Every rank reads every shard, in unit order: the same table on every rank."""
    dist.barrier()
    rows: list[dict] = []
    for u in range(n_units):
        rows.extend(read_table(_shard(folder, u)))
    return rows


def sample_units(
    folder: Path,
    problems: list,
    *,
    model,
    sampler: HFSampler,
    task,
    n: int,
    batch_size: int,
    gen: dict,
    seed_of_unit: Callable[[int], int],
    timer: Timer,
    should_stop: Callable[[], bool],
    desc: str,
    fault: str = "",
) -> tuple[list[dict], bool]:
    """Generates n completions per problem, unit by unit. Returns (all rows, stopped early)."""
    units = _units(len(problems), n, batch_size)
    todo = [u for u in dist.my_units(len(units)) if not _shard(folder, u).exists()]
    bar = progress(len(units), desc, initial=len(units) - len(todo) * dist.world())
    for u in todo:
        chunk = [problems[i] for i in units[u]]
        prompts = [sampler.encode(p) for p in chunk]
        t = time.perf_counter()
        outs = sampler.generate(model, [p for p in prompts for _ in range(n)], seed=seed_of_unit(u), **gen)
        timer["generate"] = timer.get("generate", 0.0) + time.perf_counter() - t
        rows = []
        for j, out in enumerate(outs):
            problem, prompt_ids = chunk[j // n], prompts[j // n]
            reward = task.reward(out["completion"], problem)
            rows.append(
                {
                    "prompt_id": problem.id,
                    "sample_idx": j % n,
                    "prompt_ids": prompt_ids,
                    "target": problem.answer,
                    "answer": task.extract_answer(out["completion"]),
                    "reward": reward,
                    "correct": reward >= 1 - 1e-9,
                    **out,
                }
            )
        write_table(_shard(folder, u), rows)
        faults.point(f"{fault}:u{u}")
        bar.update(dist.world())
        if should_stop():
            bar.close()
            return [], True
    bar.close()
    return gather(folder, len(units)), False


def verify_units(
    src: Path, dst: Path, n_units: int, *, scorers: list, base_logprobs: Callable | None, timer: Timer
) -> list[dict]:
    """Scores each unit (all samples of a prompt share a unit, so per-prompt scorers see whole groups)."""
    for u in dist.my_units(n_units):
        if _shard(dst, u).exists():
            continue
        rows = read_table(_shard(src, u))
        if base_logprobs is not None:
            t = time.perf_counter()
            lps = base_logprobs([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows])
            timer["forward"] = timer.get("forward", 0.0) + time.perf_counter() - t
            for r, lp in zip(rows, lps):
                r["base_logprobs"] = lp
        for scorer in scorers:
            for r, s in zip(rows, scorer(rows)):
                r[f"score/{scorer.name}"] = float(s)
        write_table(_shard(dst, u), rows)
    return gather(dst, n_units)


def n_units(n_prompts: int, n: int, batch_size: int) -> int:
    return len(_units(n_prompts, n, batch_size))


def base_logprob_fn(model, pad: int, batch_size: int) -> Callable:
    def run(prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        out: list[list[float]] = []
        for s in range(0, len(prompts), batch_size):
            out += sequence_logprobs(model, prompts[s : s + batch_size], completions[s : s + batch_size], pad)
        return out

    return run
