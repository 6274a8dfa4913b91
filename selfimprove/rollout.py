"""Rollouts: how a problem becomes rows (contract 1). One turn, or two attempts (SCoRe, Kumar et al. 2409.12917).

A rollout asks the stage context (`stages.Context`) to generate, so it runs on any sampler backend, in training rounds and in
evaluation alike. Two attempts: the first answer, then the problem, that answer and a correction
instruction (which never says whether the answer was right) and a second answer. Every row carries
`turn`; a second attempt's row also carries its first attempt (`first_completion`, `first_answer`,
`first_reward`, `first_correct`), so a table holds whole episodes, turn 1 then turn 2 per sample.
Their metrics (`metrics.self_correction`) are computed wherever such rows are summarised.
Views (Co-rewarding 2508.00410, Self-Harmony 2511.01191): each problem asked in its original form and `views` other forms the task makes
(`Task.views`), in one unit; rows carry `view` (0: the original).

`for_evaluation()` is the rollout evaluation runs: the same, or one turn where a rollout only changes
how training samples are spent (adaptive budgets, views: evaluation asks the original forms).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from selfimprove import distributed as dist
from selfimprove.distributed import derive_seed
from selfimprove.errors import ConfigError
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
    round's checked samples (None where it could fit none: the loop says so, and the round samples
    plainly). Where nothing fitted one at all (no loop) it is an error, never a silent plain sample."""
    settings = gen.get("backtrack")
    if settings is None:
        return gen
    from selfimprove.sampling.backtrack import Backtracker, TaskVerifier

    if settings.verifier == "task":
        verifier = TaskVerifier(ctx.task, list(problems), ctx.tokenizer)
    elif not hasattr(ctx.engine, "probe"):  # `selfimprove sample` refuses this at config time
        raise ValueError(
            "sampler.backtrack.verifier=probe: no probe here (the training loop fits one on a round's "
            "samples); use sampler.backtrack.verifier=task"
        )
    else:
        verifier = ctx.engine.probe
    rest = {k: v for k, v in gen.items() if k != "backtrack"}
    return rest if verifier is None else {**rest, "backtrack": Backtracker(settings, verifier)}


class OneTurn:
    """n completions of each problem: the rows of every single-turn recipe."""

    writes: tuple[str, ...] = ()  # columns beyond the core ones (contract 1)
    forms: int = 1  # the forms each problem is asked in (its original, and views)

    def check(self, task) -> None:
        return None

    def for_evaluation(self) -> OneTurn:
        """The rollout held-out evaluation runs: one that gives every problem the n samples it is asked
        for (pass@k needs k), and episodes as training sees them (two attempts stay two)."""
        return self

    def __call__(self, ctx: Context, problems: Sequence[Problem], n: int, gen: dict) -> list[dict]:
        """`gen`: what `generate` takes (max_new_tokens, temperature, weights, ...); seeded by the unit."""
        return self.draw(ctx, problems, n, gen, ctx.seed)

    def draw(
        self, ctx: Context, problems: Sequence[Problem], n: int, gen: dict, seed: int, first_idx: int = 0
    ) -> list[dict]:
        """n rows per problem, numbered from `first_idx`, from one generate call seeded by `seed`."""
        prompts = [ctx.encode(p) for p in problems]
        gen = with_backtracker(ctx, gen, [p for p in problems for _ in range(n)])
        outs = ctx.generate([p for p in prompts for _ in range(n)], seed=seed, **gen)
        return [
            attempt_row(ctx.task, problems[j // n], prompts[j // n], first_idx + j % n, out)
            for j, out in enumerate(outs)
        ]


# Manvi et al.'s self-evaluation question (2410.02725, as the paper describes it), asked after an answer;
# P(" No") / (P(" No") + P(" Yes")) is the model's confidence that restarting would not do better.
RESTART_TEMPLATE = (
    'Question: {question}\nYour answer: {answer}\nWould you do better if you started over? ("Yes." or "No.")'
)


class AdaptiveBudget(OneTurn):
    """Adaptive sample budgets (Manvi et al. 2410.02725, in the loop): `n_min` samples of every prompt
    first, then the rest of `sampler.n` only for the prompts where the model is unsure. `signal`:
    - disagreement: the first samples' answers differ (no answer counts as one): no extra forward;
    - restart: the model's own self-evaluation, P(a restart does better) read from one token after
      each first answer (the P(True) machinery with `RESTART_TEMPLATE`); unsure when even the best
      first answer has P(restart) >= threshold.
    Prompts the model is sure of keep n_min rows, so groups differ in size."""

    writes = ("budget",)  # the samples the prompt was given (n_min or n)

    def __init__(self, n_min: int = 2, signal: str = "disagreement", threshold: float = 0.5) -> None:
        if n_min < 1:
            raise ValueError(f"n_min must be >= 1, got {n_min}")
        if signal not in ("disagreement", "restart"):
            raise ValueError(f"signal: {signal!r} is not disagreement|restart")
        self.n_min, self.signal, self.threshold = n_min, signal, threshold
        self.judge = None
        if signal == "restart":
            from selfimprove.verify.ptrue import PTrue

            self.judge = PTrue(
                name="no_restart", template=RESTART_TEMPLATE, prefill="", options=(" No", " Yes")
            )

    def for_evaluation(self) -> OneTurn:
        """Evaluation samples what it declares (k per problem, one greedy): a budget is a training choice."""
        return OneTurn()

    def unsure(self, ctx: Context, rows: list[dict]) -> bool:
        if self.signal == "disagreement":
            return len({r["answer"] for r in rows}) > 1  # no answer at all, every time, is agreement too
        return 1.0 - max(self.judge.score(rows, ctx)) >= self.threshold

    def __call__(self, ctx: Context, problems: Sequence[Problem], n: int, gen: dict) -> list[dict]:
        first = self.draw(ctx, problems, min(self.n_min, n), gen, ctx.seed)
        groups = [first[i * self.n_min : (i + 1) * self.n_min] for i in range(len(problems))]
        more = [i for i, g in enumerate(groups) if n > self.n_min and self.unsure(ctx, g)]
        if more:
            extra = self.draw(
                ctx,
                [problems[i] for i in more],
                n - self.n_min,
                gen,
                derive_seed(ctx.seed, "more"),
                self.n_min,
            )
            for k, i in enumerate(more):
                groups[i] += extra[k * (n - self.n_min) : (k + 1) * (n - self.n_min)]
        return [{**row, "budget": len(g)} for g in groups for row in g]


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


class Views(OneTurn):
    """Each problem asked in its original form and `views` other forms the task makes (`Task.views`:
    the same right answer, made without reading it), in one generate call. The n samples of a problem
    are split across its forms, sample j asking form j mod (1 + V) (n = 8, V = 1: four each), so a views
    run spends what a one-turn run does; a problem with fewer views (a data row without rephrasings)
    spreads them over the forms it has. Every form keeps the problem's `prompt_id` (a group is the
    problem, all its forms); rows carry `view` (0: the original, 1..V: the task's views in its order).
    Evaluation asks the original forms only (`for_evaluation`)."""

    writes = ("view",)

    def __init__(self, views: int = 1) -> None:
        if isinstance(views, bool) or views < 1:
            raise ValueError(f"views must be >= 1, got {views!r}")
        self.views = views
        self.forms = 1 + views

    def check(self, task) -> None:
        name = type(task).__name__
        if task.max_views == 0:
            raise ValueError(f"views={self.views}: task {name} makes no views of its problems")
        if self.views > task.max_views:
            raise ValueError(
                f"views={self.views}: task {name} makes at most {task.max_views} views of a problem"
            )

    def check_samples(self, n: int) -> None:
        if n < 1 + self.views:
            raise ConfigError(
                f"sampler.n={n} cannot give each of a problem's {1 + self.views} forms (rollout.views="
                f"{self.views}, plus the original) a sample: use sampler.n >= {1 + self.views}"
            )

    def for_evaluation(self) -> OneTurn:
        return OneTurn()

    def __call__(self, ctx: Context, problems: Sequence[Problem], n: int, gen: dict) -> list[dict]:
        self.check_samples(n)
        asked: list[tuple[Problem, list[int], int]] = []  # (form, its prompt, view), one per sample
        for problem in problems:
            forms = [problem, *ctx.task.views(problem, self.views, ctx.rng("views", problem.id))]
            prompts = [ctx.encode(form) for form in forms]
            asked += [(forms[j % len(forms)], prompts[j % len(forms)], j % len(forms)) for j in range(n)]
        gen = with_backtracker(ctx, gen, [form for form, _, _ in asked])
        outs = ctx.generate([prompt for _, prompt, _ in asked], seed=ctx.seed, **gen)
        return [
            {**attempt_row(ctx.task, form, prompt, j % n, out), "view": view}
            for j, ((form, prompt, view), out) in enumerate(zip(asked, outs))
        ]


def check_views(rollout: OneTurn, n: int, select_by: str | None) -> None:
    """What views ask of the rest of a config (a ConfigError naming the keys): a sample per form, and
    model selection by view agreement only where there are views."""
    if isinstance(rollout, Views):
        rollout.check_samples(n)
    elif select_by == "unlabelled/view_agreement":
        raise ConfigError(
            "eval.select_by=unlabelled/view_agreement compares the answers of a prompt's forms: it needs "
            "rollout=views"
        )
