"""Tasks over a fixed list of rows (a file or a dataset): what JsonlTask and HFDatasetTask share.

The train/held-out split, the training order, answer extraction and answer matching live here once;
the subclasses only turn their source into validated :class:`Row`s.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

from selfimprove.logging import log
from selfimprove.tasks.base import Problem, Task, check_eval_count, is_heldout, view_of
from selfimprove.tasks.math_grader import MathGrader

_PLAIN_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:/\d+)?")
DEFAULT_ANSWER_PATTERN = r"-?\d+(?:\.\d+)?"
GRADERS = ("regex", "math")


class Row(NamedTuple):
    """One problem as read from its source."""

    key: str  # the prompt text: what the hash split and the held-out dedupe look at
    messages: list[dict[str, str]]  # ends with the user turn that asks the question
    prefill: str
    answer: str
    reference: str | None = None  # a reference completion, from the task's reference_field
    where: str = ""  # where it was read ("file:line", "path:split row 3"), to name it in messages
    views: tuple[str, ...] | None = None  # rephrasings of the question (views_field); None: the row has none


def field_text(row: dict[str, Any], name: str, where: str) -> str:
    """``row[name]`` as a string; a ValueError naming ``where`` (file and line/row) if it is absent."""
    if row.get(name) is None:
        raise ValueError(f"{where}: missing field {name!r} (fields present: {sorted(row)})")
    return str(row[name])


def field_views(row: dict[str, Any], name: str, where: str) -> tuple[str, ...] | None:
    """``row[name]``, a list of rephrasings of the question, as a tuple; None when the row has none
    (absent or null); a ValueError naming ``where`` when it is not a list of non-empty strings."""
    value = row.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(
            f"{where}: field {name!r} must be a list of non-empty strings (rephrasings), got {value!r:.80}"
        )
    return tuple(value)


def text_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line of a UTF-8 file; a ValueError naming the file and line
    on bytes that are not UTF-8 (Python's own error names neither)."""
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:  # a byte-order mark is tolerated on the first line, as editors write one
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{lineno}: not UTF-8 text (byte {err.start} of the line: {err.reason})"
                ) from None


def jsonl_records(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file; a ValueError naming the file and
    line for one that is not a JSON object."""
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON: {err}") from None
        if not isinstance(record, dict):  # ValueError like every other bad-data error
            raise ValueError(  # noqa: TRY004
                f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
            )
        yield lineno, record


def check_exists(path: str, what: str = "file") -> Path:
    """The path, or a ValueError naming it when nothing is there."""
    resolved = Path(path)
    if not resolved.exists():
        raise ValueError(f"{path}: no such {what}")
    return resolved


def distinct(rows: Iterable[Row]) -> list[Row]:
    """The first row of each prompt, in order: held-out problems must be distinct."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        if row.key not in seen:
            seen.add(row.key)
            kept.append(row)
    return kept


def hash_origin(heldout_fraction: float) -> str:
    """How :func:`hash_split` held rows out, for :meth:`RowsTask._set_rows`."""
    return f"distinct prompts held out by a stable hash, heldout_fraction={heldout_fraction}"


def hash_split(rows: Iterable[Row], heldout_fraction: float) -> tuple[list[Row], list[Row]]:
    """(train, held-out) by a stable hash of the prompt, so duplicated prompts land on one side."""
    train, heldout = [], []
    for row in rows:
        (heldout if is_heldout(row.key, heldout_fraction) else train).append(row)
    return train, distinct(heldout)


def same_answer(pred: str, truth: str) -> bool:
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


def find_answer(completion: str, pattern: re.Pattern[str], which: str = "first") -> str | None:
    """The ``which`` ("first" | "last") match of ``pattern``; its group 1 if it has groups."""
    matches = list(pattern.finditer(completion))
    if not matches:
        return None
    match = matches[0] if which == "first" else matches[-1]
    text = match.group(1) if pattern.groups else match.group(0)
    return text.strip() if text is not None else None


class RowsTask(Task):
    """A task over fixed train and held-out rows. Subclasses load their source, then call
    :meth:`_set_rows`.

    Each pass over the training rows is a fresh seeded shuffle. ``answer_match`` picks the
    ``"first"`` or ``"last"`` regex match in a completion; "last" suits chain-of-thought outputs
    that end with the answer. If ``answer_pattern`` has a capture group, group 1 is the answer.
    ``reference_field`` names the field holding a reference completion (real data for curation).
    ``system``, when given, is prepended to rows that do not start with a system message.
    ``grader``: "regex" (the pattern above, numbers compared by value) or "math" (math-verify: the
    last ``\\boxed{}`` or ``#### n``, see :mod:`selfimprove.tasks.math_grader`; the pattern is unused).
    With "math", a row whose answer holds no math answer is skipped at load, named in a warning and
    listed in ``skipped``; no row left is an error.
    ``views_field`` names the field holding rephrasings of each row's question (a list of strings): the
    row's views (`views`), the first ``k`` in the file's order. A row without one has no views; how many
    are said once, at load.
    """

    def __init__(
        self,
        source: str,
        *,
        system: str | None,
        seed: int,
        answer_pattern: str,
        answer_match: str,
        reference_field: str | None = None,
        grader: str = "regex",
        views_field: str | None = None,
    ) -> None:
        if grader not in GRADERS:
            raise ValueError(f"grader must be one of {GRADERS}, got {grader!r}")
        if answer_match not in ("first", "last"):
            raise ValueError(f"answer_match must be 'first' or 'last', got {answer_match!r}")
        self.source = source
        self.system = system
        self.seed = seed
        self.answer_regex = re.compile(answer_pattern)
        self.answer_match = answer_match
        self.reference_field = reference_field
        self._train: list[Row] = []
        self._heldout: list[Row] = []
        self._heldout_origin = ""
        self._perms: dict[int, list[int]] = {}
        self.math = MathGrader() if grader == "math" else None
        self.skipped: list[str] = []  # "where: why" for each row dropped at load (grader=math)
        self.views_field = views_field
        self._views: dict[str, tuple[str, ...]] = {}  # prompt -> its rephrasings

    def _set_rows(self, train: list[Row], heldout: list[Row], heldout_origin: str) -> None:
        """``heldout_origin`` says where the held-out rows came from, for error messages, e.g.
        "distinct prompts of its 'test' split"."""
        if self.math is not None:
            train, heldout = self._gradable(train), self._gradable(heldout)
            if self.skipped:
                more = " ..." if len(self.skipped) > 3 else ""
                log(
                    f"{self.source}: skipped {len(self.skipped)} row(s) with no math answer: {'; '.join(self.skipped[:3])}{more}"
                )
            if not train and not heldout:
                raise ValueError(
                    f"{self.source}: no row has an answer the math grader can read ({self.skipped[0]})"
                )
        self._train, self._heldout, self._heldout_origin = train, heldout, heldout_origin
        self._perms.clear()
        if self.views_field is not None:
            rows = train + heldout
            self._views = {row.key: row.views for row in rows if row.views}
            self.max_views = max((len(v) for v in self._views.values()), default=0)
            bare = sum(not row.views for row in rows)
            if bare:  # said once: a run over partly rephrased data is legitimate
                log(
                    f"{self.source}: {bare} of {len(rows)} row(s) have no {self.views_field!r}: no views of those"
                )

    def views(self, problem: Problem, k: int, rng: random.Random) -> list[Problem]:
        """The row's first ``k`` rephrasings, each with the row's prefill (``rng`` is not needed)."""
        if self.views_field is None:
            return super().views(problem, k, rng)
        rephrasings = self._views.get(problem.messages[-1]["content"], ())
        return [view_of(problem, question, problem.prefill) for question in rephrasings[:k]]

    def _gradable(self, rows: list[Row]) -> list[Row]:
        """The rows whose answer the math grader can read; the others are named in ``skipped``.
        Skipped, not refused: one odd answer among thousands should not stop a run."""
        kept = []
        for row in rows:
            try:
                self.math.gold(row.answer)
                kept.append(row)
            except ValueError as err:
                self.skipped.append(f"{row.where or row.key[:60]}: {err}")
        return kept

    @property
    def num_train(self) -> int:
        return len(self._train)

    @property
    def num_heldout(self) -> int:
        return len(self._heldout)

    def _problem(self, problem_id: str, row: Row) -> Problem:
        messages = [dict(m) for m in row.messages]  # copies: callers may edit a Problem's list
        if self.system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system})
        return Problem(
            id=problem_id, messages=messages, prefill=row.prefill, answer=row.answer, reference=row.reference
        )

    def has_references(self) -> bool:
        return self.reference_field is not None

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
            raise ValueError(f"{self.source}: no training rows (held out: {self._heldout_origin})")
        epoch, pos = divmod(index, len(self._train))
        return self._problem(f"train-{index}", self._train[self._permutation(epoch)[pos]])

    def eval_problems(self, n: int) -> list[Problem]:
        check_eval_count(n, len(self._heldout), f"{self.source} ({self._heldout_origin})")
        return [self._problem(f"eval-{i}", row) for i, row in enumerate(self._heldout[:n])]

    def extract_answer(self, completion: str) -> str | None:
        """The answer votes group by: the math grader's canonical key, or the regex's match."""
        if self.math is not None:
            return self.math.answer(completion)
        return find_answer(completion, self.answer_regex, self.answer_match)

    def reward(self, completion: str, problem: Problem) -> float:
        if self.math is not None:
            return self.math.reward(completion, problem.answer)
        pred = self.extract_answer(completion)
        return 1.0 if pred is not None and same_answer(pred, problem.answer) else 0.0
