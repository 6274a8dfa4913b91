"""Contract 2: stages — rows in, rows out, with a context.

A round between sampling and the update is one table, a row per sample (contract 1, `CORE_COLUMNS`).
A scorer adds a `score/<name>` column; a selector drops rows, weights them or adds real-data rows.
Each stage declares the columns it reads and writes, so a recipe whose selector reads a score that no
scorer writes fails when the config is composed (`check_columns`), before any model loads.

A stage never holds the policy: it asks the `Context`, which offers the engine's `generate`,
`logprobs` and `next_token_logprobs`, the tokenizer, the task, generators seeded per unit of work, and
`log(name, value)` for the stage's metrics (the loop adds them to the round's record). So stages are pure functions of their rows plus those calls, unit tested with a tiny model.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from selfimprove.distributed import derive_seed

# What sampling writes: every stage may read these.
CORE_COLUMNS = frozenset(
    {
        "prompt_id",
        "sample_idx",
        "messages",
        "prefill",
        "prompt_ids",
        "completion_ids",
        "completion",
        "logprobs",
        "self_certainty",
        "entropy",
        "answer",
        "target",
        "reward",
        "correct",
    }
)


class Stage:
    """Rows in, rows out. Subclasses set `reads`/`writes` (column names) and implement `__call__`.

    `needs_reference`: the stage asks for the frozen base's log-probs (a full fine-tune then keeps a
    frozen copy; LoRA's base is the adapter switched off). `uses_ema`: the stage asks the context for
    the "ema" weights (under ZeRO-3/FSDP2 the loop then gathers the average on every rank before the
    phase's units: a gather inside one unit would not pair up across ranks). `check(task)` raises
    ValueError when the task cannot serve the stage (e.g. curation with real data from a task without
    references).
    """

    name: str = "stage"
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    needs_reference: bool = False
    uses_ema: bool = False
    probability: bool = False  # a scorer whose score is a probability of being right (calibration applies)

    def check(self, task: Any) -> None:
        return None

    def __call__(self, rows: list[dict], ctx: Context) -> list[dict]:
        raise NotImplementedError


class Scorer(Stage):
    """A stage that adds one float per row, as `score/<name>`; subclasses implement `score`."""

    @property
    def column(self) -> str:
        return f"score/{self.name}"

    @property
    def writes(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.column,)

    def score(self, rows: list[dict], ctx: Context) -> list[float]:
        raise NotImplementedError

    def __call__(self, rows: list[dict], ctx: Context) -> list[dict]:
        if rows and all(self.column in r for r in rows):
            return rows  # scored already (a resumed round, a table scored before): never twice
        scores = self.score(rows, ctx)
        if len(scores) != len(rows):
            raise ValueError(f"scorer {self.name!r} gave {len(scores)} scores for {len(rows)} rows")
        return [{**r, self.column: float(s)} for r, s in zip(rows, scores)]


def score_of(row: dict, name: str) -> float:
    """`row["score/<name>"]` as a float; nan reads as -inf so it is never picked."""
    key = f"score/{name}"
    if key not in row:
        raise KeyError(f"row lacks {key!r}: is a scorer named {name!r} configured?")
    s = float(row[key])
    return -float("inf") if s != s else s


@dataclass
class Context:
    """What a stage may ask for. `engine` offers generate / logprobs / next_token_logprobs /
    classifier (tests may pass anything with those methods); `seed` is the unit's own seed. Rollouts
    take it too, so generation is timed here, in one place (`timer`)."""

    engine: Any
    task: Any
    seed: int
    batch_size: int = 64
    timer: dict[str, float] = field(default_factory=dict)
    logged: dict[str, Any] = field(default_factory=dict)  # what stages reported with `log`

    def log(self, name: str, value: Any) -> None:
        """A metric of the stage's work (e.g. the share of prompts a selector kept), for the round's
        record: the stage keeps no state for the loop to read."""
        self.logged[name] = value

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def rng(self, *parts: object) -> random.Random:
        """A generator seeded by (unit seed, *parts): the same draws on any rank, after any resume."""
        return random.Random(derive_seed(self.seed, *parts))

    def encode(self, problem: Any) -> list[int]:
        """A problem's prompt ids, as the sampler builds them (chat template + prefill)."""
        return self.engine.sampler.encode(problem)

    def _timed(self, what: str, fn, *args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.timer[what] = self.timer.get(what, 0.0) + time.perf_counter() - t

    def generate(self, prompts: list[list[int]], weights: str = "policy", **gen) -> list[dict]:
        """Completions (with per-token stats) from the policy, or from the "ema" weights."""
        return self._timed("generate", self.engine.generate, prompts, weights=weights, **gen)

    def logprobs(
        self, prompt_ids: list[list[int]], completion_ids: list[list[int]], weights: str = "policy"
    ) -> list[list[float]]:
        return self._timed(
            "forward", self.engine.logprobs, prompt_ids, completion_ids, weights, self.batch_size
        )

    def next_token_logprobs(
        self, prefix: list[int], suffixes: list[list[int]], candidates: Sequence[int], weights: str = "policy"
    ) -> list[list[float]]:
        """log p(candidate | prefix + suffix) for each suffix; the prefix (non-empty) is computed once,
        a suffix may be empty."""
        return self._timed(
            "forward",
            self.engine.next_token_logprobs,
            prefix,
            suffixes,
            list(candidates),
            weights=weights,
            batch_size=self.batch_size,
        )

    def classifier(self, path: str) -> Any:
        """A sequence-classification model (a reward model) by path, loaded once by the engine."""
        return self.engine.classifier(path)


def order_stages(scorers: list[Stage], sampled: frozenset[str] = CORE_COLUMNS) -> list[Stage]:
    """The scorers in an order where every score a scorer reads is written before it (a combined
    score after its parts); config order otherwise. A ValueError names a score nothing writes."""
    available = set(sampled)
    pending, ordered = list(scorers), []
    while pending:
        ready = [s for s in pending if set(s.reads) <= available]
        if not ready:
            stage = pending[0]
            missing = sorted(set(stage.reads) - available - {c for s in pending for c in s.writes})
            raise ValueError(
                f"verifier {stage.name!r} reads {missing or sorted(set(stage.reads) - available)}, "
                f"which no verifier writes (verifiers write: {sorted(c for s in scorers for c in s.writes)})"
            )
        for s in ready:
            ordered.append(s)
            available |= set(s.writes)
            pending.remove(s)
    return ordered


def check_columns(
    scorers: list[Stage], selector: Stage, objective: Any = None, rollout_writes: Sequence[str] = ()
) -> list[Stage]:
    """Every column the selector (and the objective) reads is sampled (`CORE_COLUMNS` plus what the
    rollout adds, e.g. `turn`) or written by a stage before it; a ValueError names both ends. Returns
    the scorers in the order they run (`order_stages`)."""
    sampled = CORE_COLUMNS | set(rollout_writes)
    ordered = order_stages(scorers, sampled)
    written = {c for s in ordered for c in s.writes}
    missing = sorted(set(selector.reads) - sampled - written)
    if missing:
        raise ValueError(
            f"selector {selector.name!r} reads {missing}, which no verifier writes "
            f"(verifiers write: {sorted(written)}; add one, e.g. +verifier@verifiers.NAME=NAME)"
        )
    missing = sorted(set(getattr(objective, "reads", ())) - sampled - written - set(selector.writes))
    if missing:
        raise ValueError(
            f"objective {objective.name!r} reads {missing}, which no verifier or selector writes "
            f"(e.g. +verifier@verifiers.reference=reference_base for ref_logprobs, selector=group_advantage "
            "for advantage)"
        )
    return ordered
