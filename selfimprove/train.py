"""The update phase: K optimizer steps on the selected examples, through accelerate.

Each step's batch is drawn from a generator seeded by (seed, round, step), split into micro-batches,
and micro-batch m runs on rank m % world with dropout seeded by (seed, round, step, m). The loss is
divided by the objective's normalizer over the whole step's batch (contract 3: token-mean,
sequence-mean or a constant), the same on every rank, so one rank and two ranks compute the same
gradient. Ranks with fewer micro-batches run a zero-weighted one so every rank runs the same number
of backward passes (DDP and FSDP reduce on the last; DeepSpeed is told it is the boundary). A step
whose loss or gradient is not finite is skipped on every rank (under DeepSpeed in bf16/fp32 it is
only flagged: its step runs inside DeepSpeed, which skips only fp16 overflows).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch

from selfimprove import backends, faults
from selfimprove import distributed as dist
from selfimprove.sampling.hf import forward_inputs, left_pad

# row column -> batch key, for the token-aligned columns collate pads when every example has them
TOKEN_COLUMNS = {
    "logprobs": "old_logprobs",
    "ref_logprobs": "ref_logprobs",
    "ema_logprobs": "ema_logprobs",
    "advantage": "advantages",
}
# row column -> batch key, for the per-sequence numbers collate stacks when every example has them
ROW_COLUMNS = {"weight": "weights", "turn": "turns", "rep_len": "rep_lens"}


def collate(examples: list[dict], pad: int) -> dict[str, torch.Tensor]:
    """Left-padded input ids and attention mask; labels that are -100 except on completions; and every
    token-aligned column all the examples carry (old and reference log-probs, advantages — a scalar
    advantage is spread over its sequence's tokens), shaped like labels, 0 off the completions; and
    per-sequence numbers (`weights`, `turns`, `rep_lens`) when every row has the column."""
    input_ids, attention = left_pad([e["prompt_ids"] + e["completion_ids"] for e in examples], pad)
    width = input_ids.shape[1]
    labels = torch.full_like(input_ids, -100)
    for i, e in enumerate(examples):
        n = len(e["completion_ids"])
        labels[i, width - n :] = torch.tensor(e["completion_ids"])
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    for column, key in TOKEN_COLUMNS.items():
        if not all(e.get(column) is not None for e in examples):
            continue
        values = torch.zeros(input_ids.shape, dtype=torch.float32)
        for i, e in enumerate(examples):
            n = len(e["completion_ids"])
            per_token = e[column] if isinstance(e[column], (list, tuple)) else [float(e[column])] * n
            if len(per_token) != n:
                raise ValueError(f"{column}: {len(per_token)} values for {n} completion tokens")
            values[i, width - n :] = torch.tensor(per_token, dtype=torch.float32)
        batch[key] = values
    for column, key in ROW_COLUMNS.items():
        if all(e.get(column) is not None for e in examples):
            batch[key] = torch.tensor([float(e[column]) for e in examples])
    return batch


def step_batch(n_examples: int, batch_size: int, seed: int) -> list[int]:
    """The examples one optimizer step trains on; all of them when there are fewer than a batch."""
    rng = random.Random(seed)
    if n_examples <= batch_size:
        return list(range(n_examples))
    return sorted(rng.sample(range(n_examples), batch_size))


def _my_micro_batches(micro: list) -> list[tuple[int, object, float]]:
    """(global index, examples, weight) of the micro-batches this rank runs; padded with a
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


def update(
    engine,
    objective,
    examples: list[dict],
    *,
    cfg,
    seed_of_step: Callable[..., int],
    start_step: int,
    after_step: Callable[[int, dict], bool],
    fault: str = "",
) -> None:
    """Runs steps start_step..cfg.steps_per_round-1. `after_step(step, metrics)` runs after each
    optimizer step (EMA, logging, preemption checkpoints) and returns True to stop early."""
    accelerator, model, optimizer, scheduler = (
        engine.accelerator,
        engine.model,
        engine.optimizer,
        engine.scheduler,
    )
    batch_size = cfg.micro_batch_size * cfg.grad_accum
    world = dist.world()
    deepspeed = backends.is_deepspeed(accelerator)
    engine.before_update()
    model.train()
    for step in range(start_step, cfg.steps_per_round):
        # an objective may train on a per-step view of the rows (DITTO: its sequences or MLE, by a coin)
        pool = objective.step_examples(examples, seed_of_step(step, "objective"))
        chosen = [pool[i] for i in step_batch(len(pool), batch_size, seed_of_step(step))]
        batches = [
            collate(chosen[i : i + cfg.micro_batch_size], engine.pad)
            for i in range(0, len(chosen), cfg.micro_batch_size)
        ]
        n_tokens = sum(len(e["completion_ids"]) for e in chosen)
        normalizer = objective.normalizer(batches)  # the whole step's, on every rank
        mine = _my_micro_batches(batches)
        loss_total, sums = 0.0, {}
        for i, (j, cpu_batch, weight) in enumerate(mine):
            torch.manual_seed(seed_of_step(step, j))  # dropout: the same masks on any number of ranks
            batch = {k: v.to(accelerator.device) for k, v in cpu_batch.items()}
            with backends.accumulating(accelerator, model, last=i == len(mine) - 1):
                logits = model(
                    **forward_inputs(batch["input_ids"], batch["attention_mask"], accelerator.device)
                ).logits
                loss_sum, _, objective_metrics = objective(logits, batch)
                if faults.nan_here(f"{fault}:s{step + 1}"):
                    loss_sum = loss_sum * float("nan")
                # Ranks average gradients; scaling by world makes it the step's global mean.
                backends.backward(accelerator, model, loss_sum * (weight * world / normalizer))
            loss_total += loss_sum.item() * weight
            for name, (total, count) in objective_metrics.items():
                old = sums.get(name, (0.0, 0.0))
                sums[name] = (old[0] + float(total) * weight, old[1] + float(count) * weight)
        if deepspeed:  # DeepSpeed clips and steps at the boundary itself
            grad_norm = backends.deepspeed_step(model)
        else:
            grad_norm = backends.clip_and_norm(accelerator, model, cfg.max_grad_norm)
        loss_all, bad, objective_means = _over_ranks(loss_total, not math.isfinite(grad_norm), sums)
        skipped = bad > 0 or not math.isfinite(loss_all)
        if not skipped and not deepspeed:  # a non-finite step would poison the weights, EMA, checkpoints
            optimizer.step()
        scheduler.step()  # the schedule follows the step count either way
        optimizer.zero_grad(set_to_none=True)
        metrics = {
            "train/loss": loss_all / normalizer,
            "train/grad_norm": float(grad_norm),
            "train/lr": scheduler.get_last_lr()[0],
            "train/examples": len(chosen),
            "train/tokens": n_tokens,
            **objective_means,
        }
        if skipped:
            metrics["train/skipped_nonfinite"] = True
            if dist.is_main():
                print(f"[selfimprove] step {step + 1}: loss or gradient not finite, step skipped")
        if after_step(step + 1, metrics):
            break
    model.eval()
    engine.after_update()
