"""A task backed by a JSONL (or Parquet) file of question/answer rows.

Errors name the file and the JSONL line (or Parquet row). For folders, saved datasets and their own
test splits, use :class:`selfimprove.tasks.HFDatasetTask`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfimprove.tasks.base import check_heldout_fraction
from selfimprove.tasks.rows import (
    DEFAULT_ANSWER_PATTERN,
    Row,
    RowsTask,
    check_exists,
    field_text,
    field_views,
    hash_origin,
    hash_split,
    jsonl_records,
)


def _read_parquet(path: str) -> list[tuple[str, dict[str, Any]]]:
    import pyarrow as pa  # lazy: only Parquet users pay the import
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path}: not a readable Parquet file ({reason})") from None
    try:
        records = table.to_pylist()
    except UnicodeDecodeError as err:  # pyarrow reads string columns without checking them
        raise ValueError(f"{path}: text that is not UTF-8 ({err.reason})") from None
    return [(f"row {i}", row) for i, row in enumerate(records)]


def _load_rows(path: str) -> list[tuple[str, dict[str, Any]]]:
    """Rows paired with a location label ("12" for a JSONL line, "row 3" for Parquet)
    so validation errors can point at the offending record."""
    if check_exists(path).is_dir():
        raise ValueError(f"{path}: is a folder; JsonlTask reads one file (HFDatasetTask reads folders)")
    if Path(path).suffix == ".parquet":
        return _read_parquet(path)
    return [(str(lineno), row) for lineno, row in jsonl_records(path)]


class JsonlTask(RowsTask):
    """Question/answer rows from a file, split train/held-out by a stable hash of the prompt
    (so duplicated prompts always land on the same side). Matching options: see
    :class:`~selfimprove.tasks.rows.RowsTask`.
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
        answer_pattern: str = DEFAULT_ANSWER_PATTERN,
        answer_match: str = "first",
        reference_field: str | None = None,
        grader: str = "regex",
        views_field: str | None = None,
    ) -> None:
        super().__init__(
            str(path),
            system=system,
            seed=seed,
            answer_pattern=answer_pattern,
            answer_match=answer_match,
            reference_field=reference_field,
            grader=grader,
            views_field=views_field,
        )
        self.path = self.source
        self.heldout_fraction = check_heldout_fraction(heldout_fraction)
        # Validated up front so errors surface at startup, not rounds later.
        rows = []
        for where, record in _load_rows(self.path):
            location = f"{self.path}:{where}"
            prompt = field_text(record, prompt_field, location)
            answer = field_text(record, answer_field, location).strip()
            prefill = field_text(record, prefill_field, location) if prefill_field else ""
            reference = field_text(record, reference_field, location) if reference_field else None
            views = field_views(record, views_field, location) if views_field else None
            messages = [{"role": "user", "content": prompt}]
            rows.append(Row(prompt, messages, prefill, answer, reference, location, views))
        if not rows:
            raise ValueError(f"{self.path}: no rows (the file is empty)")
        train, heldout = hash_split(rows, self.heldout_fraction)
        self._set_rows(train, heldout, hash_origin(self.heldout_fraction))
