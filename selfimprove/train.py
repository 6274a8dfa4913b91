"""The update phase: K optimizer steps on the selected examples, through accelerate.

Each step's batch is drawn from a generator seeded by (seed, round, step), split into micro-batches,
and micro-batch m runs on rank m % world. The loss is the token-mean over the whole step's batch on
every rank, so one rank and two ranks compute the same gradient. Ranks with fewer micro-batches run
a zero-weighted one so DDP sees the same number of backward passes everywhere.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable

import torch

from selfimprove import distributed as dist
from selfimprove.sampling.hf import forward_inputs, left_pad


def collate(examples: list[dict], pad: int) -> dict[str, torch.Tensor]:
    """Left-padded input ids, attention mask, and labels that are -100 except on completions."""
    input_ids, attention = left_pad([e["prompt_ids"] + e["completion_ids"] for e in examples], pad)
    labels = torch.full_like(input_ids, -100)
    for i, e in enumerate(examples):
        n = len(e["completion_ids"])
        labels[i, input_ids.shape[1] - n :] = torch.tensor(e["completion_ids"])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def step_batch(n_examples: int, batch_size: int, seed: int) -> list[int]:
    """The examples one optimizer step trains on; all of them when there are fewer than a batch."""
    rng = random.Random(seed)
    if n_examples <= batch_size:
        return list(range(n_examples))
    return sorted(rng.sample(range(n_examples), batch_size))


def update(
    accelerator,
    model,
    optimizer,
    scheduler,
    objective,
    examples: list[dict],
    *,
    cfg,
    pad: int,
    seed_of_step: Callable[[int], int],
    start_step: int,
    after_step: Callable[[int, dict], bool],
    progress=None,
) -> None:
    """Runs steps start_step..cfg.steps_per_round-1. `after_step(step, metrics)` runs after each
    optimizer step (EMA, logging, preemption checkpoints) and returns True to stop early."""
    batch_size = cfg.micro_batch_size * cfg.grad_accum
    world, rank = dist.world(), dist.rank()
    model.train()
    for step in range(start_step, cfg.steps_per_round):
        chosen = [examples[i] for i in step_batch(len(examples), batch_size, seed_of_step(step))]
        micro = [chosen[i : i + cfg.micro_batch_size] for i in range(0, len(chosen), cfg.micro_batch_size)]
        n_tokens = sum(len(e["completion_ids"]) for e in chosen)
        per_rank = math.ceil(len(micro) / world)
        mine = [
            (micro[j], 1.0) if j < len(micro) else (micro[0], 0.0)
            for j in range(rank, per_rank * world, world)
        ]
        loss_total = 0.0
        for j, (mb, weight) in enumerate(mine):
            batch = {k: v.to(accelerator.device) for k, v in collate(mb, pad).items()}
            sync = j == len(mine) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                logits = model(
                    **forward_inputs(batch["input_ids"], batch["attention_mask"], accelerator.device)
                ).logits
                loss_sum, _, _ = objective(logits, batch)
                # DDP averages gradients over ranks; scaling by world makes it a global token-mean.
                accelerator.backward(loss_sum * (weight * world / n_tokens))
            loss_total += loss_sum.item() * weight
        grad_norm = accelerator.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        (loss_all,) = dist.all_sum([loss_total])
        metrics = {
            "train/loss": loss_all / max(n_tokens, 1),
            "train/grad_norm": float(grad_norm),
            "train/lr": scheduler.get_last_lr()[0],
            "train/examples": len(chosen),
            "train/tokens": n_tokens,
        }
        if progress is not None:
            progress(metrics)
        if after_step(step + 1, metrics):
            break
    model.eval()
