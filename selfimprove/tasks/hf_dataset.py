"""A task backed by a local Hugging Face dataset: a folder saved with ``save_to_disk``, a folder of
data files, or one ``.jsonl``/``.json``/``.parquet``/``.csv`` file, read through ``datasets``.

Rows hold either a ``messages`` column (chat messages; the conversation up to its last user turn is
the prompt) or a question column, plus an answer column with the ground truth. The dataset's own
test split is the held-out set when it has one; otherwise a stable hash of the prompt splits it.
Nothing is fetched from the Hub: a path that does not exist is an error.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfimprove.tasks.base import check_heldout_fraction
from selfimprove.tasks.rows import (
    DEFAULT_ANSWER_PATTERN,
    Row,
    RowsTask,
    check_exists,
    distinct,
    field_text,
    field_views,
    hash_origin,
    hash_split,
    text_lines,
)

if TYPE_CHECKING:
    from datasets import Dataset

DATA_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _data_files(folder: Path) -> list[Path]:
    """The data files ``load_dataset(folder)`` would read (it skips hidden files too)."""
    return sorted(
        f
        for f in folder.rglob("*")
        if f.suffix in DATA_FORMATS and not any(part.startswith(".") for part in f.relative_to(folder).parts)
    )


def _check_data_file(file: Path) -> None:
    """Name the file (and line) where ``datasets`` fails obscurely or late: an empty file (a bare
    StopIteration), text that is not UTF-8 (pyarrow may load it, and fail when a row is read), a
    Parquet file without rows (a DatasetGenerationError)."""
    if DATA_FORMATS[file.suffix] != "parquet":
        empty = True
        for _, line in text_lines(str(file)):  # reads every line, so bad UTF-8 is named with its line
            empty = empty and not line.strip()
        if empty:
            raise ValueError(f"{file}: empty file")
    else:
        import pyarrow.parquet as pq

        try:
            num_rows = pq.ParquetFile(file).metadata.num_rows
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise ValueError(f"{file}: not a readable Parquet file ({_first_line(err)})") from None
        if num_rows == 0:
            raise ValueError(f"{file}: no rows")


def _check_saved(folder: Path) -> None:
    """``load_from_disk`` fails with a bare IndexError on a saved split without rows; name it."""
    for state in [folder / "state.json", *folder.glob("*/state.json")]:
        if state.is_file() and json.loads(state.read_text()).get("_data_files") == []:
            raise ValueError(f"{state.parent}: no rows (an empty saved dataset)")


def load_splits(path: str, cache_dir: str | None = None) -> dict[str, Dataset]:
    """Every split of the local dataset at ``path``: a ``save_to_disk`` folder, a folder of data
    files (splits from file names, e.g. train.jsonl/test.jsonl), or one data file ("train")."""
    import datasets

    resolved = check_exists(path, "file or folder")
    if resolved.is_dir() and any((resolved / m).is_file() for m in _SAVED_MARKERS):
        _check_saved(resolved)
        load = partial(datasets.load_from_disk, path)
    elif resolved.is_dir():
        files = _data_files(resolved)
        if not files:
            raise ValueError(f"{path}: no data files ({', '.join(DATA_FORMATS)}) and no saved dataset")
        for file in files:
            _check_data_file(file)
        load = partial(datasets.load_dataset, path, cache_dir=cache_dir)  # splits from file names
    else:
        if resolved.suffix not in DATA_FORMATS:
            raise ValueError(f"{path}: unknown data file type; expected one of {', '.join(DATA_FORMATS)}")
        _check_data_file(resolved)
        fmt = DATA_FORMATS[resolved.suffix]
        load = partial(datasets.load_dataset, fmt, data_files=path, cache_dir=cache_dir)
    try:
        loaded = load()
    except Exception as err:  # datasets raises many types (DatasetGenerationError, StopIteration, ...)
        raise ValueError(f"{path}: cannot load as a dataset ({_first_line(err)})") from err
    return {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)


def prompt_messages(value: Any, where: str) -> list[dict[str, str]]:
    """The conversation up to and including its last user turn (later turns are the reference
    solution, which the model must not see)."""
    valid = isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )
    if not valid:
        raise ValueError(f"{where}: messages must be a list of {{role, content}} strings, got {value!r:.80}")
    users = [i for i, m in enumerate(value) if m["role"] == "user"]
    if not users:
        raise ValueError(f"{where}: messages have no user turn")
    return [{"role": m["role"], "content": m["content"]} for m in value[: users[-1] + 1]]


class HFDatasetTask(RowsTask):
    """Problems from a local dataset (see the module docstring).

    ``split`` gives the training rows. ``eval_split`` gives the held-out rows: by default the
    dataset's ``"test"`` split if it has one, else a stable hash split of ``split`` with
    ``heldout_fraction``. Training rows whose prompt also appears in the held-out split are dropped,
    so the two never overlap. ``messages_field`` is used when the dataset has that column, else
    ``prompt_field``. ``cache_dir`` is where ``datasets`` caches data files it converts (default:
    its own cache). Matching options: see :class:`~selfimprove.tasks.rows.RowsTask`.
    """

    def __init__(
        self,
        path: str,
        split: str = "train",
        eval_split: str | None = None,
        prompt_field: str = "question",
        messages_field: str | None = "messages",
        answer_field: str = "answer",
        system: str | None = None,
        prefill_field: str | None = None,
        heldout_fraction: float = 0.2,
        seed: int = 0,
        answer_pattern: str = DEFAULT_ANSWER_PATTERN,
        answer_match: str = "first",
        reference_field: str | None = None,
        grader: str = "regex",
        cache_dir: str | None = None,
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
        self.fields = (prompt_field, messages_field, answer_field, prefill_field, reference_field)
        splits = load_splits(self.path, cache_dir)
        if eval_split is None and split != "test" and "test" in splits:
            eval_split = "test"
        for name in (split, eval_split):
            if name is not None and name not in splits:
                raise ValueError(f"{self.path}: no split {name!r} (splits: {sorted(splits)})")
        if eval_split == split:
            raise ValueError(f"{self.path}: eval_split and split are both {split!r}")
        train = self._rows(splits[split], split)
        if eval_split is None:
            train, heldout = hash_split(train, self.heldout_fraction)
            self._set_rows(train, heldout, hash_origin(self.heldout_fraction))
        else:
            heldout = distinct(self._rows(splits[eval_split], eval_split))
            heldout_keys = {row.key for row in heldout}
            train = [row for row in train if row.key not in heldout_keys]
            self._set_rows(train, heldout, f"distinct prompts of its {eval_split!r} split")

    def _rows(self, dataset: Dataset, split: str) -> list[Row]:
        prompt_field, messages_field, answer_field, prefill_field, reference_field = self.fields
        where = f"{self.path}:{split}"
        use_messages = messages_field is not None and messages_field in dataset.column_names
        needed = [messages_field if use_messages else prompt_field, answer_field]
        needed += [f for f in (prefill_field, reference_field) if f]
        for name in needed:
            if name not in dataset.column_names:
                raise ValueError(f"{where}: missing field {name!r} (columns: {dataset.column_names})")
        if self.views_field in dataset.column_names:  # optional: a row without one has no views
            needed.append(self.views_field)
        if len(dataset) == 0:
            raise ValueError(f"{where}: no rows")
        try:
            records = dataset.select_columns(needed).to_list()
        except UnicodeDecodeError as err:  # Parquet or a saved dataset: text files were checked
            raise ValueError(f"{where}: text that is not UTF-8 ({err.reason})") from None
        rows = []
        for i, record in enumerate(records):
            location = f"{where} row {i}"
            if use_messages:
                if record[messages_field] is None:
                    raise ValueError(f"{location}: missing field {messages_field!r}")
                messages = prompt_messages(record[messages_field], location)
            else:
                messages = [{"role": "user", "content": field_text(record, prompt_field, location)}]
            answer = field_text(record, answer_field, location).strip()
            prefill = field_text(record, prefill_field, location) if prefill_field else ""
            reference = field_text(record, reference_field, location) if reference_field else None
            views = field_views(record, self.views_field, location) if self.views_field in record else None
            rows.append(Row(messages[-1]["content"], messages, prefill, answer, reference, location, views))
        return rows
