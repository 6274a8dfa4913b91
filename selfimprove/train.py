"""The update phase: K optimizer steps on the selected examples, through accelerate.

`steps(...)` yields after each optimizer step; the loop does the rest inline (EMA, logging, the
collective stop decision, checkpoints). Each step's batch is drawn from a generator seeded by (seed,
round, step) and split into micro-batches that keep a prompt's rows together (so they share its
prefix: `selfimprove.logprobs`); micro-batch m runs on rank m % world with dropout seeded by (seed,
round, step, m). The objective's normalizer is computed once per step from all of its rows, the same
on every rank, so one rank and two ranks compute the same gradient. Ranks with fewer micro-batches
run a zero-weighted one so every rank runs the same number of backward passes (DDP and FSDP reduce
on the last; DeepSpeed is told it is the boundary).

A step whose loss or gradient is not finite changes no weights: without DeepSpeed the optimizer step
is not taken; DeepSpeed skips it itself and says so (its optimizer's `overflow`; seen with 0.19.8, the
version scripts/setup.sh installs, in fp32 and bf16: tests/test_bad_input.py with ZeRO-2 in fp32,
tests/test_backends.py with ZeRO-3 in bf16 on two ranks). Were a
non-finite step ever applied (a DeepSpeed that does not check), the update stops with an error before
the EMA, a checkpoint or the next step sees those weights.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator

import torch

from selfimprove import backends, faults
from selfimprove import distributed as dist
from selfimprove.logprobs import first_scored, scored_logprobs


class NonFiniteStepApplied(RuntimeError):
    """DeepSpeed applied a step whose gradient was not finite: the weights must not be kept."""


def columns_of(objective) -> tuple[str, ...]:
    """The row columns a batch carries for `objective`: what it reads, what it may use, and `weight`."""
    return tuple(dict.fromkeys((*objective.reads, *objective.optional, "weight")))


def collate(rows: list[dict], columns: tuple[str, ...], scope: str = "completion") -> dict[str, torch.Tensor]:
    """The batch an objective reads besides the log-probs, left-aligned like them: `completion` [B, W]
    (the completion's tokens among the scored ones) and each of `columns` that every row carries,
    under its own name — a per-token list padded to [B, W] at the completion's tokens, a number
    stacked to [B]."""
    # the completion's first token sits at this column of the scored ones
    offsets = [max(len(r["prompt_ids"]) - first_scored(r["prompt_ids"], scope), 0) for r in rows]
    width = max([o + len(r["completion_ids"]) for o, r in zip(offsets, rows)] + [1])
    completion = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (o, r) in enumerate(zip(offsets, rows)):
        completion[i, o : o + len(r["completion_ids"])] = True
    batch = {"completion": completion}
    for column in columns:
        if not rows or not all(r.get(column) is not None for r in rows):
            continue
        if isinstance(rows[0][column], (list, tuple)):
            values = torch.zeros(len(rows), width)
            for i, (o, r) in enumerate(zip(offsets, rows)):
                values[i, o : o + len(r[column])] = torch.tensor(r[column], dtype=torch.float32)
            batch[column] = values
        else:
            batch[column] = torch.tensor([float(r[column]) for r in rows])
    return batch


def check_rows(rows: list[dict], columns: tuple[str, ...]) -> None:
    """Before any weights change: every per-token column has one value per completion token."""
    for r in rows:
        for column in columns:
            values = r.get(column)
            if isinstance(values, (list, tuple)) and len(values) != len(r["completion_ids"]):
                raise ValueError(
                    f"row prompt_id={r.get('prompt_id')!r} sample_idx={r.get('sample_idx')!r}: {column} has "
                    f"{len(values)} values for {len(r['completion_ids'])} completion tokens"
                )


def micro_batch_loss(
    model, rows: list[dict], objective, normalizer, *, pad: int, share: str = "auto"
) -> tuple[torch.Tensor, dict]:
    """One micro-batch's share of the step's loss, and its metrics: the scored tokens' log-probs (by
    the path `share` picks), the batch of the columns the objective reads, the objective."""
    scored = scored_logprobs(
        model,
        [(r["prompt_ids"], r["completion_ids"]) for r in rows],
        pad,
        objective.temperature,
        share=share,
        scope=objective.scope,
    )
    batch = {
        k: v.to(scored.logps.device) for k, v in collate(rows, columns_of(objective), objective.scope).items()
    }
    batch.update(tokens=scored.tokens, scored=scored.scored)
    return objective(scored.logps, batch, normalizer)


def step_batch(n_examples: int, batch_size: int, seed: int) -> list[int]:
    """The examples one optimizer step trains on; all of them when there are fewer than a batch."""
    rng = random.Random(seed)
    if n_examples <= batch_size:
        return list(range(n_examples))
    return sorted(rng.sample(range(n_examples), batch_size))


def micro_batches(rows: list[dict], size: int) -> list[list[dict]]:
    """Rows grouped by problem (`prompt_id`, else the prompt's ids; first appearance order), the
    groups packed in order into micro-batches of at most `size` rows; a group larger than `size` is
    split. A problem's rows share its prompt, and a second attempt's prompt holds its first attempt:
    together they share that prefix in the update's forward."""
    groups: dict[object, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("prompt_id", tuple(r["prompt_ids"])), []).append(r)
    out: list[list[dict]] = [[]]
    for group in groups.values():
        for start in range(0, len(group), size):
            part = group[start : start + size]
            if len(out[-1]) + len(part) > size:
                out.append([])
            out[-1].extend(part)
    return [m for m in out if m]


def _my_micro_batches(micro: list) -> list[tuple[int, object, float]]:
    """(global index, rows, weight) of the micro-batches this rank runs; padded with a
    zero-weighted repeat so every rank runs as many backward passes as the busiest one."""
    world, rank = dist.world(), dist.rank()
    per_rank = math.ceil(len(micro) / world)
    return [
        (j, micro[j], 1.0) if j < len(micro) else (j, micro[0], 0.0)
        for j in range(rank, per_rank * world, world)
    ]


def _over_ranks(loss: float, bad: bool, sums: dict[str, tuple[float, float]]) -> tuple[float, float, dict]:
    """One collective for the step: the summed loss, how many ranks saw a non-finite gradient, and
    each objective metric's sum / count over every micro-batch of every rank."""
    names = sorted(sums)  # every rank runs the same objective, so the same names
    totals = dist.all_sum([loss, float(bad)] + [v for k in names for v in sums[k]])
    means = {k: totals[2 + 2 * i] / max(totals[3 + 2 * i], 1e-12) for i, k in enumerate(names)}
    return totals[0], totals[1], means


def steps(
    engine,
    objective,
    examples: list[dict],
    *,
    cfg,
    seed_of_step: Callable[..., int],
    start: int = 0,
    fault: str = "",
) -> Iterator[tuple[int, dict]]:
    """Runs optimizer steps start..cfg.steps_per_round-1, yielding (steps done, metrics) after each."""
    accelerator, model, optimizer, scheduler = (
        engine.accelerator,
        engine.model,
        engine.optimizer,
        engine.scheduler,
    )
    columns = columns_of(objective)
    check_rows(examples, columns)
    batch_size = cfg.micro_batch_size * cfg.grad_accum
    world = dist.world()
    deepspeed = backends.is_deepspeed(accelerator)
    share = str(cfg.share_prefix).lower()
    engine.before_update()
    model.train()
    try:
        for step in range(start, cfg.steps_per_round):
            # an objective may train on a per-step view of the rows (DITTO: its sequences or MLE, by a coin)
            pool = objective.step_examples(examples, seed_of_step(step, "objective"))
            chosen = [pool[i] for i in step_batch(len(pool), batch_size, seed_of_step(step))]
            normalizer = objective.normalizer(chosen)  # the whole step's, on every rank
            mine = _my_micro_batches(micro_batches(chosen, cfg.micro_batch_size))
            loss_total, sums = 0.0, {}
            for i, (j, rows, weight) in enumerate(mine):
                torch.manual_seed(seed_of_step(step, j))  # dropout: the same masks on any number of ranks
                with backends.accumulating(accelerator, model, last=i == len(mine) - 1):
                    loss, objective_metrics = micro_batch_loss(
                        model, rows, objective, normalizer, pad=engine.pad, share=share
                    )
                    if faults.nan_here(f"{fault}:s{step + 1}"):
                        loss = loss * float("nan")
                    # Ranks average gradients; scaling by world makes it the step's global mean.
                    backends.backward(accelerator, model, loss * (weight * world))
                loss_total += loss.item() * weight
                for name, (total, count) in objective_metrics.items():
                    old = sums.get(name, (0.0, 0.0))
                    sums[name] = (old[0] + float(total) * weight, old[1] + float(count) * weight)
            ds_skipped = False
            if deepspeed:  # DeepSpeed clips and steps (or skips) at the boundary itself
                grad_norm, ds_skipped = backends.deepspeed_step(model)
            else:
                grad_norm = backends.clip_and_norm(accelerator, model, cfg.max_grad_norm)
            finite = not ds_skipped and (grad_norm is None or math.isfinite(grad_norm))
            loss_all, bad, objective_means = _over_ranks(loss_total, not finite, sums)
            nonfinite = bad > 0 or not math.isfinite(loss_all)
            if deepspeed and nonfinite and not ds_skipped:
                raise NonFiniteStepApplied(
                    f"step {step + 1}: the loss or gradient is not finite and DeepSpeed applied the step "
                    "(it checks only with bf16.check_grad_overflow / fp16); stopping before the EMA or a "
                    "checkpoint keeps it: resume=auto continues from the last checkpoint"
                )
            # a non-finite step would poison the weights, the EMA and checkpoints (DeepSpeed stepped above)
            if not nonfinite and not deepspeed:
                optimizer.step()
            scheduler.step()  # the schedule follows the step count either way
            optimizer.zero_grad(set_to_none=True)
            metrics = {
                "train/loss": loss_all,
                "train/grad_norm": grad_norm,
                "train/lr": scheduler.get_last_lr()[0],
                "train/examples": len(chosen),
                "train/tokens": sum(len(e["completion_ids"]) for e in chosen),
                **objective_means,
            }
            if nonfinite:
                metrics["train/skipped_nonfinite"] = True
                if dist.is_main():
                    print(f"[selfimprove] step {step + 1}: loss or gradient not finite, step skipped")
            yield step + 1, metrics
    finally:
        model.eval()
