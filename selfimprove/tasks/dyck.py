"""Balanced brackets (Dyck words over () and []): the task of Botta et al.'s exact-verifier study.

A problem is the open beginning of a random Dyck word, written with spaces ("( [ ( ] ..." style, one
bracket per token for most tokenizers); the prefill repeats it and the model continues it. A
completion is correct when the prefix and the completion's brackets form a balanced word and the
completion holds nothing but brackets and spaces. The answer is the completion's brackets without
spaces, so "distinct answers" counts distinct continuations.

`prefix_error` is the exact process verifier: can this prefix still be completed? No when a bracket
closes the wrong one or nothing, a character is not a bracket, the sequence ended unbalanced, or more
brackets are open than tokens remain (one bracket per token: conservative for a tokenizer that merges
brackets into one token).
"""

from __future__ import annotations

import random

from selfimprove.tasks.base import Problem, Task, check_eval_count, check_heldout_fraction, is_heldout

PAIRS = {")": "(", "]": "["}
OPEN = set(PAIRS.values())


def open_stack(text: str) -> list[str] | None:
    """The brackets left open after `text` (spaces skipped), or None when `text` cannot begin a
    Dyck word: a wrong or unmatched closer, or a character that is not a bracket."""
    stack: list[str] = []
    for ch in text:
        if ch.isspace():
            continue
        if ch in OPEN:
            stack.append(ch)
        elif ch in PAIRS and stack and stack[-1] == PAIRS[ch]:
            stack.pop()
        else:
            return None
    return stack


def closing(stack: list[str]) -> str:
    """The shortest completion: every open bracket closed, innermost first."""
    close = {v: k for k, v in PAIRS.items()}
    return " ".join(close[b] for b in reversed(stack))


class DyckTask(Task):
    """Complete a bracket sequence. `length`: brackets in the given prefix; the prefix is the first
    `length` brackets of a random Dyck word of 2 × `length` brackets (so some stay open)."""

    def __init__(self, length: int = 8, seed: int = 0, heldout_fraction: float = 0.34) -> None:
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.length, self.seed = length, seed
        self.heldout_fraction = check_heldout_fraction(heldout_fraction)

    def _prefix(self, rng: random.Random) -> str:
        """The first `length` brackets of a uniformly random walk that stays completable."""
        out: list[str] = []
        stack: list[str] = []
        for i in range(self.length):
            can_open = len(stack) < 2 * self.length - i - 1  # room left to close it in the full word
            if stack and (not can_open or rng.random() < 0.5):
                b = stack.pop()
                out.append(")" if b == "(" else "]")
            else:
                b = rng.choice("([")
                stack.append(b)
                out.append(b)
        return " ".join(out)

    def _problem(self, problem_id: str, prefix: str) -> Problem:
        stack = open_stack(prefix) or []
        return Problem(
            id=problem_id,
            messages=[
                {
                    "role": "user",
                    "content": "Continue this bracket sequence so that every bracket is closed, "
                    f"writing brackets only: {prefix}",
                }
            ],
            prefill=prefix,
            answer=closing(stack).replace(" ", ""),
            reference=closing(stack),
        )

    def train_problem(self, index: int) -> Problem:
        if index < 0:
            raise ValueError(f"train index must be non-negative, got {index}")
        rng = random.Random(f"{self.seed}:dyck:train:{index}")
        for _ in range(10_000):
            prefix = self._prefix(rng)
            if open_stack(prefix) and not is_heldout(prefix, self.heldout_fraction):
                return self._problem(f"train-{index}", prefix)
        raise RuntimeError(f"no training prefix found for index {index}")

    def eval_problems(self, n: int) -> list[Problem]:
        rng = random.Random(f"{self.seed}:dyck:eval")
        chosen: list[str] = []
        seen: set[str] = set()
        for _ in range(max(10_000, 50 * n)):
            if len(chosen) >= n:
                break
            prefix = self._prefix(rng)
            if prefix not in seen and open_stack(prefix) and is_heldout(prefix, self.heldout_fraction):
                seen.add(prefix)
                chosen.append(prefix)
        check_eval_count(n, len(chosen), f"dyck length {self.length}")
        return [self._problem(f"eval-{i}", p) for i, p in enumerate(chosen)]

    def has_references(self) -> bool:
        return True

    def extract_answer(self, completion: str) -> str | None:
        """The completion's brackets, spaces removed; None if it holds anything else."""
        text = "".join(completion.split())
        return text if text and all(ch in OPEN or ch in PAIRS for ch in text) else None

    def reward(self, completion: str, problem: Problem) -> float:
        answer = self.extract_answer(completion)
        return float(answer is not None and open_stack(problem.prefill + answer) == [])

    def prefix_error(self, problem: Problem, text: str, ended: bool, remaining: int) -> bool:
        """The exact process verifier (module docstring)."""
        stack = open_stack(problem.prefill + text)
        if stack is None:
            return True
        return bool(stack) if ended else len(stack) > remaining
