"""Task interface shared by every task, plus small helpers for splitting and number formatting.

Correctness convention: a completion is *correct* when ``task.reward(...) >= 1 - 1e-9``.
Use :func:`is_correct` (or the equivalent :meth:`Task.is_correct`) rather than re-deriving it,
so partial-credit rewards (e.g. RandomCalculation's numeric reward) never count as correct.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction

CORRECT_THRESHOLD = 1.0 - 1e-9


@dataclass(frozen=True)
class Problem:
    """One task instance.

    ``messages`` is a list, so a ``Problem`` compares by value but is not hashable; key
    dictionaries on ``problem.id`` instead.
    """

    id: str  # stable, unique within the task, e.g. "train-17" / "eval-3"
    messages: list[dict[str, str]]  # chat messages, e.g. [{"role": "user", "content": ...}]
    prefill: str  # text the assistant turn starts with; "" for none
    answer: str  # ground-truth answer as a canonical string
    reference: str | None = None  # a reference completion (real data for curation); None: none


class Task(ABC):
    """Base class for tasks: an infinite training stream plus a disjoint held-out set.

    Capabilities are declared here, not probed: ``max_views`` is how many views (equivalent forms of a
    problem, the same right answer) :meth:`views` can make; 0 means none, and a views rollout refuses
    the task at config time."""

    max_views: int = 0

    @abstractmethod
    def train_problem(self, index: int) -> Problem:
        """The ``index``-th training problem (deterministic for any ``index >= 0``)."""

    @abstractmethod
    def eval_problems(self, n: int) -> list[Problem]:
        """The first ``n`` distinct held-out problems; ``ValueError`` if fewer exist."""

    @abstractmethod
    def extract_answer(self, completion: str) -> str | None:
        """Canonical answer found in ``completion`` (text generated after the prefill)."""

    @abstractmethod
    def reward(self, completion: str, problem: Problem) -> float:
        """Reward in [0, 1]; 1.0 means correct."""

    def has_references(self) -> bool:
        """Whether every problem carries a reference completion (real data to mix in)."""
        return False

    def reference_completion(self, problem: Problem) -> str:
        """The text a correct assistant turn continues the prefill with; ValueError if none."""
        if problem.reference is None:
            raise ValueError(f"problem {problem.id} has no reference completion")
        return problem.reference

    def is_correct(self, completion: str, problem: Problem) -> bool:
        """True when the reward reaches 1 (up to float tolerance)."""
        return self.reward(completion, problem) >= CORRECT_THRESHOLD

    def views(self, problem: Problem, k: int, rng: random.Random) -> list[Problem]:
        """Up to ``k`` (<= ``max_views``) other forms of ``problem`` whose right answer is the same, made
        from the question alone (never from ``problem.answer``, which a view only carries along for the
        grader); fewer where a problem has fewer (a data row without rephrasings). A view keeps the
        problem's id: it is the same problem asked another way. ValueError for a task without views."""
        raise ValueError(f"task {type(self).__name__} makes no views of its problems")


def view_of(problem: Problem, question: str, prefill: str) -> Problem:
    """``problem`` asked as ``question`` (the last user turn's new text) with ``prefill``; no reference
    completion (a view's would have to be written from the answer)."""
    messages = [dict(m) for m in problem.messages]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last_user]["content"] = question
    return dataclasses.replace(problem, messages=messages, prefill=prefill, reference=None)


def is_correct(task: Task, completion: str, problem: Problem) -> bool:
    """True when ``task.reward(completion, problem) >= 1 - 1e-9``."""
    return task.reward(completion, problem) >= CORRECT_THRESHOLD


def stable_fraction(text: str) -> float:
    """Map ``text`` to [0, 1) with sha256, so splits are identical across runs and machines.

    Python's ``hash`` is salted per process, which would silently leak eval items into training.
    """
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_heldout(text: str, heldout_fraction: float) -> bool:
    """Whether ``text`` falls in the held-out part of the space."""
    return stable_fraction(text) < heldout_fraction


def check_heldout_fraction(heldout_fraction: float) -> float:
    """Validate the split fraction; 1.0 would leave no training problems (infinite rejection)."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    return float(heldout_fraction)


def check_eval_count(n: int, available: int, source: str) -> None:
    """Validate an ``eval_problems(n)`` request against the ``available`` held-out problems.

    The message starts with the request so that a caller can prefix the config key it came from
    ("eval.n_problems: asked for 500 held-out problems but ... has only 297; ...").
    """
    if n < 0:
        raise ValueError(f"asked for {n} held-out problems; the count must be non-negative")
    if n > available:
        raise ValueError(
            f"asked for {n} held-out problems but {source} has only {available}; ask for at most {available}"
        )


def canonical_number(value: Fraction | int | str, digits: int = 6) -> str:
    """Canonical string for a number: integers exactly ("65", "-3"), otherwise a plain decimal
    rounded to ``digits`` significant digits with trailing zeros stripped ("2.5", "0.333333").

    Never uses exponent notation, so the string is what a model would be expected to write.
    """
    frac = Fraction(value)
    if frac.denominator == 1:
        return str(frac.numerator)
    with localcontext() as ctx:
        # Decimal division is correctly rounded, so prec=digits gives exactly that many significant digits.
        ctx.prec = digits
        ctx.rounding = ROUND_HALF_UP
        dec = Decimal(frac.numerator) / Decimal(frac.denominator)
    text = format(dec, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def numeric_reward(pred: float, truth: float) -> float:
    """RandomCalculation reward: 1 - 0.5*min(|a-b|, 1) - 0.5*min(|a-b|/(|b|+1e-6), 1), in [0, 1].

    Here, not in one task, because the arithmetic task's partial credit and the general graded
    reward (`verify.rewards.graded_reward`) share it."""
    diff = abs(pred - truth)
    if not math.isfinite(diff):
        return 0.0
    reward = 1.0 - 0.5 * min(diff, 1.0) - 0.5 * min(diff / (abs(truth) + 1e-6), 1.0)
    return min(max(reward, 0.0), 1.0)
