"""An open-ended text task: continue a passage of prose.

Used by repetition-penalty methods (DITTO) and for held-out perplexity. There is no answer to check:
``reward`` is 0 and callers see ``task.open_ended``. A problem has no chat messages, so the sampler
encodes its prefill alone, as raw text a language model continues.

Sources: the built-in corpus (``path=None``, *Alice's Adventures in Wonderland*), a ``.txt`` file
(paragraphs separated by blank lines), a ``.jsonl`` file (a text ``field`` per line), or a local
dataset (a ``save_to_disk`` folder, a folder of data files, or one ``.json``/``.parquet``/``.csv``
file; every split is read, column ``field``). Each JSONL line or dataset row is its own text, so
documents never run across two of them; a ``.txt`` file is one text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from selfimprove.tasks.base import Problem, check_heldout_fraction
from selfimprove.tasks.rows import (
    DEFAULT_ANSWER_PATTERN,
    Row,
    RowsTask,
    check_exists,
    field_text,
    hash_origin,
    hash_split,
    jsonl_records,
    text_lines,
)

BUILTIN_CORPUS = Path(__file__).resolve().parent.parent / "data" / "alice.txt"
MIN_CONTINUATION_WORDS = 16  # shorter continuations say little about repetition or perplexity

_WORD = re.compile(r"\S+")
# A sentence ends at . ! or ?, possibly followed by one closing quote or bracket, then whitespace.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][”’\"')\]])\s+")


def paragraphs(text: str) -> list[str]:
    """Blocks of ``text`` separated by blank lines, each with its wrapped lines joined by spaces."""
    return [joined for block in re.split(r"\n[ \t\r\f\v]*\n", text) if (joined := " ".join(block.split()))]


def _units(paragraph: str, doc_words: int) -> list[str]:
    """The paragraph, or, if it is longer than a document, its sentences (a sentence that is itself
    longer is cut every ``doc_words`` words), so no document grows far past ``doc_words``."""
    if len(paragraph.split()) <= doc_words:
        return [paragraph]
    units = []
    for sentence in _SENTENCE_BREAK.split(paragraph):
        words = sentence.split()
        units += [" ".join(words[i : i + doc_words]) for i in range(0, len(words), doc_words)]
    return units


def chunk_documents(paras: Iterable[str], doc_words: int, min_words: int = 0) -> list[str]:
    """Consecutive paragraphs joined (with blank lines) into chunks of about ``doc_words`` words, so
    short dialogue paragraphs merge. A chunk ends once it reaches ``doc_words``, or before a
    paragraph that would overshoot ``doc_words`` by more than the chunk falls short of it (if the
    chunk has ``min_words``), so lengths centre on ``doc_words``. The last chunk may be shorter."""
    docs: list[str] = []
    parts: list[str] = []
    count = 0
    for para in paras:
        for k, unit in enumerate(_units(para, doc_words)):
            n = len(unit.split())
            if parts and count >= min_words and count + n - doc_words > doc_words - count:
                docs.append("".join(parts))
                parts, count = [], 0
            if parts:  # pieces of one long paragraph stay in one paragraph
                parts.append("\n\n" if k == 0 else " ")
            parts.append(unit)
            count += n
            if count >= doc_words:
                docs.append("".join(parts))
                parts, count = [], 0
    if parts:
        docs.append("".join(parts))
    return docs


def split_document(text: str, prompt_words: int) -> tuple[str, str]:
    """(prompt, continuation): the first ``prompt_words`` words, and the rest. The continuation keeps
    its leading whitespace, so ``prompt + continuation == text`` and a tokenizer sees the word
    boundary where it would in the whole text (a prompt ending in a space tokenizes unnaturally)."""
    ends = [m.end() for m in islice(_WORD.finditer(text), prompt_words)]
    cut = ends[-1] if ends else 0
    return text[:cut], text[cut:]


def _jsonl_texts(path: str, field: str) -> Iterator[str]:
    for lineno, record in jsonl_records(path):
        yield field_text(record, field, f"{path}:{lineno}")


def _dataset_texts(path: str, field: str) -> Iterator[str]:
    from selfimprove.tasks.hf_dataset import load_splits  # lazy: imports `datasets`

    for split, dataset in sorted(load_splits(path).items()):
        where = f"{path}:{split}"
        if field not in dataset.column_names:
            raise ValueError(f"{where}: missing field {field!r} (columns: {dataset.column_names})")
        for i, value in enumerate(dataset[field]):
            yield field_text({field: value}, field, f"{where} row {i}")


def read_texts(path: str | None, field: str = "text") -> list[str]:
    """The texts of a source (see the module docstring); each is cut into documents on its own."""
    resolved = BUILTIN_CORPUS if path is None else check_exists(str(path), "file or folder")
    if resolved.is_file() and resolved.suffix == ".txt":
        # Lines keep their newlines, so joining with "" restores the file (read via text_lines for
        # errors that name the line of bytes that are not UTF-8).
        return ["".join(line for _, line in text_lines(str(resolved)))]
    if resolved.is_file() and resolved.suffix == ".jsonl":
        return list(_jsonl_texts(str(path), field))
    return list(_dataset_texts(str(path), field))


class TextTask(RowsTask):
    """Continue a passage: prompt = a document's first ``prompt_words`` words, the reference
    continuation = the rest (see the module docstring for sources).

    Documents are about ``doc_words`` words (see :func:`chunk_documents`); those with fewer than
    ``prompt_words + 16`` words are dropped. A stable hash of a document's text puts it in the
    held-out set with probability ``heldout_fraction``; the split and the training order (a fresh
    seeded shuffle per pass) are the row tasks' (`RowsTask`).
    """

    open_ended = True  # no answer to check: reward is 0, callers must not count accuracy

    def __init__(
        self,
        path: str | None = None,
        field: str = "text",
        doc_words: int = 120,
        prompt_words: int = 32,
        heldout_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        if prompt_words < 1:
            raise ValueError(f"prompt_words must be >= 1, got {prompt_words}")
        min_words = prompt_words + MIN_CONTINUATION_WORDS
        if doc_words < min_words:
            raise ValueError(
                f"doc_words={doc_words} is below prompt_words + {MIN_CONTINUATION_WORDS} = {min_words}, "
                "the shortest document kept"
            )
        source = str(BUILTIN_CORPUS) if path is None else str(path)
        super().__init__(
            source, system=None, seed=seed, answer_pattern=DEFAULT_ANSWER_PATTERN, answer_match="first"
        )
        heldout_fraction = check_heldout_fraction(heldout_fraction)
        docs = [
            doc
            for text in read_texts(None if path is None else str(path), field)
            for doc in chunk_documents(paragraphs(text), doc_words, min_words)
            if len(doc.split()) >= min_words
        ]
        if not docs:
            raise ValueError(f"{source}: no documents of at least {min_words} words")
        # no messages: the sampler encodes the prefill alone, without a chat template
        rows = [Row(doc, [], *split_document(doc, prompt_words), None) for doc in docs]
        rows = [row._replace(reference=row.answer) for row in rows]
        self._set_rows(*hash_split(rows, heldout_fraction), hash_origin(heldout_fraction))

    def eval_documents(self, n: int) -> list[tuple[str, str]]:
        """(prompt, continuation) of the first ``n`` held-out documents, for held-out perplexity of
        the continuation given the prompt (the same documents as ``eval_problems(n)``)."""
        return [(p.prefill, p.answer) for p in self.eval_problems(n)]

    def has_references(self) -> bool:
        return True  # every problem's reference is the document's real continuation

    def extract_answer(self, completion: str) -> str | None:
        return None  # open-ended: nothing to extract

    def reward(self, completion: str, problem: Problem) -> float:
        return 0.0  # open-ended: nothing to check
