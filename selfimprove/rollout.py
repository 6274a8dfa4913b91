"""Rollouts: how a problem becomes rows (contract 1). One turn, or two attempts (SCoRe, Kumar et al. 2409.12917).

A rollout asks the stage context (`stages.Context`) to generate, so it runs on any sampler backend, in training rounds and in
evaluation alike. Two attempts: the first answer, then the problem, that answer and a correction
instruction (which never says whether the answer was right) and a second answer. Every row carries
`turn`; a second attempt's row also carries its first attempt (`first_completion`, `first_answer`,
`first_reward`, `first_correct`), so a table holds whole episodes, turn 1 then turn 2 per sample.
Their metrics (`metrics.self_correction`) are computed wherever such rows are summarised.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from selfimprove import distributed as dist
from selfimprove.stages import Context
from selfimprove.tasks.base import CORRECT_THRESHOLD, Problem

# the correction instruction of SCoRe's MATH prompt (App. C), for a short-answer task
DEFAULT_INSTRUCTION = (
    "There might be an error in the answer above because of lack of understanding of the question. "
    "Please correct the error, if any, and give the answer again."
)
FIRST_ATTEMPT = ("first_completion", "first_answer", "first_reward", "first_correct")


def attempt_row(task, problem: Problem, prompt_ids: list[int], sample_idx: int, out: dict) -> dict:
    """One sampled completion as a row: the problem, the prompt, what was generated, its reward."""
    reward = task.reward(out["completion"], problem)
    return {
        "prompt_id": problem.id,
        "sample_idx": sample_idx,
        "messages": problem.messages,
        "prefill": problem.prefill,
        "prompt_ids": prompt_ids,
        "target": problem.answer,
        "answer": task.extract_answer(out["completion"]),
        "reward": reward,
        "correct": reward >= CORRECT_THRESHOLD,
        **out,
    }


def with_backtracker(ctx: Context, gen: dict, problems: Sequence[Problem]) -> dict:
    """`gen` with its backtracking settings (`sampler.backtrack`) made into this call's `Backtracker`:
    the task's exact prefix check on these rows' problems, or the probe the loop fitted on the last
    round's checked samples (none before there are any: the first round samples plainly)."""
    settings = gen.get("backtrack")
    if settings is None or not hasattr(settings, "verifier"):
        return gen
    from selfimprove.sampling.backtrack import Backtracker, TaskVerifier

    if settings.verifier == "task":
        verifier = TaskVerifier(ctx.task, list(problems), ctx.tokenizer)
    else:
        verifier = getattr(ctx.engine, "probe", None)
    rest = {k: v for k, v in gen.items() if k != "backtrack"}
    return rest if verifier is None else {**rest, "backtrack": Backtracker(settings, verifier)}


class OneTurn:
    """n completions of each problem: the rows of every single-turn recipe."""

    writes: tuple[str, ...] = ()  # columns beyond the core ones (contract 1)

    def check(self, task) -> None:
        return None

    def __call__(self, ctx: Context, problems: Sequence[Problem], n: int, gen: dict) -> list[dict]:
        """`gen`: what `generate` takes (max_new_tokens, temperature, weights, ...); seeded by the unit."""
        prompts = [ctx.encode(p) for p in problems]
        gen = with_backtracker(ctx, gen, [p for p in problems for _ in range(n)])
        outs = ctx.generate([p for p in prompts for _ in range(n)], seed=ctx.seed, **gen)
        return [
            attempt_row(ctx.task, problems[j // n], prompts[j // n], j % n, out) for j, out in enumerate(outs)
        ]


class TwoAttempts(OneTurn):
    """SCoRe's episode: x, y1, then x2 = [x, y1, instruction] and y2, sampled as the first was."""

    writes = ("turn", *FIRST_ATTEMPT)

    def __init__(self, instruction: str = DEFAULT_INSTRUCTION) -> None:
        if not instruction.strip():
            raise ValueError("the correction instruction is empty")
        self.instruction = instruction

    def check(self, task) -> None:
        if getattr(task, "open_ended", False):
            raise ValueError("two attempts need a task with an answer to correct, not open-ended text")

    def retry(self, problem: Problem, first: dict) -> Problem:
        """The second turn's problem: the conversation so far, then the instruction; same prefill."""
        messages = [
            *problem.messages,
            {"role": "assistant", "content": problem.prefill + first["completion"]},
            {"role": "user", "content": self.instruction},
        ]
        return dataclasses.replace(problem, messages=messages)

    def __call__(self, ctx: Context, problems: Sequence[Problem], n: int, gen: dict) -> list[dict]:
        firsts = super().__call__(ctx, problems, n, gen)
        retries = [self.retry(problems[j // n], row) for j, row in enumerate(firsts)]
        prompts = [ctx.encode(p) for p in retries]
        gen = with_backtracker(ctx, gen, [problems[j // n] for j in range(len(retries))])
        outs = ctx.generate(prompts, seed=dist.derive_seed(ctx.seed, "turn2"), **gen)
        rows = []
        for j, (first, out) in enumerate(zip(firsts, outs)):
            second = attempt_row(ctx.task, problems[j // n], prompts[j], first["sample_idx"], out)
            second.update(turn=2, **{k: first[k.removeprefix("first_")] for k in FIRST_ATTEMPT})
            first.update(turn=1, **dict.fromkeys(FIRST_ATTEMPT))  # same columns in every row (Parquet)
            rows += [first, second]
        return rows
