"""A task backed by a JSONL (or Parquet) file of question/answer rows."""

from __future__ import annotations

import json
import random
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

from selfimprove.tasks.base import Problem, Task, check_heldout_fraction, is_heldout

_PLAIN_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:/\d+)?")


def _load_rows(path: str) -> list[tuple[str, dict[str, Any]]]:
    """Rows paired with a location label ("12" for a JSONL line, "row 3" for Parquet)
    so validation errors can point at the offending record."""
    if Path(path).suffix == ".parquet":
        import pyarrow.parquet as pq  # lazy: only Parquet users pay the import

        table = pq.read_table(path)
        return [(f"row {i}", row) for i, row in enumerate(table.to_pylist())]
    rows = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {err}") from None
            if not isinstance(row, dict):  # ValueError like every other bad-data error
                raise ValueError(  # noqa: TRY004
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append((str(lineno), row))
    return rows


def _field(path: str, where: str, row: dict[str, Any], name: str) -> str:
    if row.get(name) is None:
        raise ValueError(f"{path}:{where}: missing field {name!r} (fields present: {sorted(row)})")
    return str(row[name])


def _same_answer(pred: str, truth: str) -> bool:
    """String match after strip, falling back to numeric equality so "65.0" matches "65"."""
    pred, truth = pred.strip(), truth.strip()
    if pred == truth:
        return True
    # Only plain numbers: Fraction("1e999999999") would build a gigantic integer.
    if not (_PLAIN_NUMBER.fullmatch(pred) and _PLAIN_NUMBER.fullmatch(truth)):
        return False
    try:
        return Fraction(pred) == Fraction(truth)
    except ZeroDivisionError:
        return False


class JsonlTask(Task):
    """Question/answer rows from a file, split train/held-out by a stable hash of the prompt
    (so duplicated prompts always land on the same side).

    ``answer_match`` picks the ``"first"`` or ``"last"`` regex match in a completion; "last"
    suits chain-of-thought outputs that end with the answer. If ``answer_pattern`` has a capture
    group, group 1 is the answer.
    """

    def __init__(
        self,
        path: str,
        prompt_field: str = "question",
        answer_field: str = "answer",
        system: str | None = None,
        prefill_field: str | None = None,
        heldout_fraction: float = 0.2,
        seed: int = 0,
        answer_pattern: str = r"-?\d+(?:\.\d+)?",
        answer_match: str = "first",
    ) -> None:
        if answer_match not in ("first", "last"):
            raise ValueError(f"answer_match must be 'first' or 'last', got {answer_match!r}")
        self.path = str(path)
        self.system = system
        self.seed = seed
        self.heldout_fraction = check_heldout_fraction(heldout_fraction)
        self.answer_regex = re.compile(answer_pattern)
        self.answer_match = answer_match
        # (prompt, prefill, answer) triples, validated up front so errors surface at startup.
        self._train: list[tuple[str, str, str]] = []
        self._heldout: list[tuple[str, str, str]] = []
        seen_heldout: set[str] = set()
        rows = _load_rows(self.path)
        if not rows:
            raise ValueError(f"{self.path}: no rows")
        for where, row in rows:
            prompt = _field(self.path, where, row, prompt_field)
            answer = _field(self.path, where, row, answer_field).strip()
            prefill = _field(self.path, where, row, prefill_field) if prefill_field else ""
            if not is_heldout(prompt, self.heldout_fraction):
                self._train.append((prompt, prefill, answer))
            elif prompt not in seen_heldout:  # eval problems must be distinct
                seen_heldout.add(prompt)
                self._heldout.append((prompt, prefill, answer))
        self._perms: dict[int, list[int]] = {}

    @property
    def num_train(self) -> int:
        return len(self._train)

    @property
    def num_heldout(self) -> int:
        return len(self._heldout)

    def _problem(self, problem_id: str, item: tuple[str, str, str]) -> Problem:
        prompt, prefill, answer = item
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": prompt})
        return Problem(id=problem_id, messages=messages, prefill=prefill, answer=answer)

    def _permutation(self, epoch: int) -> list[int]:
        # A fresh seeded shuffle per pass over the data; cache a few epochs only.
        if epoch not in self._perms:
            if len(self._perms) >= 4:
                self._perms.clear()
            perm = list(range(len(self._train)))
            random.Random(f"{self.seed}:train:{epoch}").shuffle(perm)
            self._perms[epoch] = perm
        return self._perms[epoch]

    def train_problem(self, index: int) -> Problem:
        if index < 0:
            raise ValueError(f"train index must be non-negative, got {index}")
        if not self._train:
            raise ValueError(f"{self.path}: no training rows (heldout_fraction={self.heldout_fraction})")
        epoch, pos = divmod(index, len(self._train))
        return self._problem(f"train-{index}", self._train[self._permutation(epoch)[pos]])

    def eval_problems(self, n: int) -> list[Problem]:
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        if n > len(self._heldout):
            raise ValueError(
                f"{self.path} has only {len(self._heldout)} distinct held-out rows "
                f"(heldout_fraction={self.heldout_fraction}); asked for {n}"
            )
        return [self._problem(f"eval-{i}", item) for i, item in enumerate(self._heldout[:n])]

    def extract_answer(self, completion: str) -> str | None:
        matches = list(self.answer_regex.finditer(completion))
        if not matches:
            return None
        match = matches[0] if self.answer_match == "first" else matches[-1]
        text = match.group(1) if self.answer_regex.groups else match.group(0)
        return text.strip() if text is not None else None

    def reward(self, completion: str, problem: Problem) -> float:
        pred = self.extract_answer(completion)
        return 1.0 if pred is not None and _same_answer(pred, problem.answer) else 0.0
