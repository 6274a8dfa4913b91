"""HFDatasetTask on small real datasets built in tmp folders: saved DatasetDicts, data files, folders."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfimprove.tasks import HFDatasetTask, JsonlTask, Task

TRAIN = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(40)]
TEST = [{"question": f"What is {i} * 3?", "answer": str(3 * i)} for i in range(6)]


@pytest.fixture(autouse=True)
def _quiet() -> None:
    datasets.disable_progress_bars()


def _task(path: Path, tmp_path: Path, **kwargs) -> HFDatasetTask:
    return HFDatasetTask(str(path), cache_dir=str(tmp_path / "hf_cache"), **kwargs)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prompts(problems) -> set[str]:
    return {p.messages[-1]["content"] for p in problems}


def test_saved_dataset_dict_uses_its_test_split(tmp_path: Path) -> None:
    # One test prompt also sits in train (and a duplicate in test): it must be dropped from training.
    train = [*TRAIN, TEST[0]]
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list([*TEST, TEST[1]])}
    )
    dd.save_to_disk(tmp_path / "ds")
    task = _task(tmp_path / "ds", tmp_path, system="Be brief.")
    assert isinstance(task, Task)
    assert (task.num_train, task.num_heldout) == (len(TRAIN), len(TEST))
    evals = task.eval_problems(len(TEST))
    assert _prompts(evals) == {r["question"] for r in TEST}
    assert _prompts(task.train_problem(i) for i in range(task.num_train)) == {r["question"] for r in TRAIN}
    p = evals[0]
    assert p.messages[0] == {"role": "system", "content": "Be brief."}
    assert p.id == "eval-0" and p.prefill == ""
    assert task.reward(f"It is {p.answer}.", p) == 1.0 and task.reward("no", p) == 0.0
    with pytest.raises(ValueError, match=r"^asked for 7 held-out problems but .*'test' split\) has only 6;"):
        task.eval_problems(7)


def test_single_split_dataset_matches_jsonl_task(tmp_path: Path) -> None:
    # No test split: the same stable hash split, order and matching as JsonlTask on the same rows.
    jsonl = _write_jsonl(tmp_path / "qa.jsonl", TRAIN)
    datasets.Dataset.from_list(TRAIN).save_to_disk(tmp_path / "saved")
    reference = JsonlTask(str(jsonl), seed=5)
    for source in (jsonl, tmp_path / "saved"):
        task = _task(source, tmp_path, seed=5)
        assert task.num_heldout == reference.num_heldout > 0
        assert task.eval_problems(task.num_heldout) == reference.eval_problems(reference.num_heldout)
        assert [task.train_problem(i) for i in range(50)] == [reference.train_problem(i) for i in range(50)]


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_other_data_files(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"qa.{suffix}"
    getattr(datasets.Dataset.from_list(TRAIN), f"to_{suffix}")(str(path))
    task = _task(path, tmp_path)
    assert task.num_train + task.num_heldout == len(TRAIN)
    p = task.train_problem(0)
    assert task.reward(p.answer, p) == 1.0  # csv reads answers as ints; matching is on their text


def test_folder_of_data_files_uses_test_file(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", TRAIN)
    _write_jsonl(folder / "test.jsonl", TEST)
    task = _task(folder, tmp_path)
    assert (task.num_train, task.num_heldout) == (len(TRAIN), len(TEST))
    assert _prompts(task.eval_problems(len(TEST))) == {r["question"] for r in TEST}
    # eval_split names another split explicitly; a missing one is an error.
    swapped = _task(folder, tmp_path, split="test", eval_split="train")
    assert swapped.num_heldout == len(TRAIN)
    with pytest.raises(ValueError, match=r"data: no split 'validation' \(splits: \['test', 'train'\]\)"):
        _task(folder, tmp_path, eval_split="validation")
    with pytest.raises(ValueError, match="eval_split and split are both 'train'"):
        _task(folder, tmp_path, eval_split="train")


def test_messages_column_prompt_ends_at_last_user_turn(tmp_path: Path) -> None:
    def convo(i: int) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": "You add numbers."},
            {"role": "user", "content": "What is 1 + 1?"},
            {"role": "assistant", "content": "2"},
            {"role": "user", "content": f"What is {i} + 1?"},
            {"role": "assistant", "content": f"The answer is {i + 1}."},  # the reference: never shown
        ]

    rows = [{"messages": convo(i), "answer": str(i + 1)} for i in range(30)]
    _write_jsonl(tmp_path / "chat.jsonl", rows)
    task = _task(tmp_path / "chat.jsonl", tmp_path, system="ignored: the rows have their own")
    p = task.train_problem(0)
    i = int(p.answer) - 1
    assert p.messages == convo(i)[:4]
    assert task.reward(f"{i + 1}", p) == 1.0
    # The split hashes the last user turn, as JsonlTask hashes its question.
    questions = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(30)]
    plain = JsonlTask(str(_write_jsonl(tmp_path / "plain.jsonl", questions)))
    assert _prompts(task.eval_problems(task.num_heldout)) == _prompts(plain.eval_problems(plain.num_heldout))


# --- bad input: one-line ValueErrors that name the file (and row or line) ---------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nowhere: no such file or folder"):
        _task(tmp_path / "nowhere", tmp_path)


def test_empty_inputs(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: empty file"):
        _task(tmp_path / "empty.jsonl", tmp_path)
    datasets.Dataset.from_list(TRAIN[:0]).to_parquet(str(tmp_path / "none.parquet"))
    with pytest.raises(ValueError, match=r"none\.parquet: no rows"):
        _task(tmp_path / "none.parquet", tmp_path)
    datasets.Dataset.from_dict({"question": [], "answer": []}).save_to_disk(tmp_path / "empty_ds")
    with pytest.raises(ValueError, match=r"empty_ds: no rows"):
        _task(tmp_path / "empty_ds", tmp_path)
    splits = {"train": TRAIN, "test": TRAIN[:0]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(
        tmp_path / "empty_test"
    )
    with pytest.raises(ValueError, match=r"empty_test/test: no rows"):
        _task(tmp_path / "empty_test", tmp_path)
    # A split that loads but holds no rows (a CSV with only its header).
    (tmp_path / "header.csv").write_text("question,answer\n")
    with pytest.raises(ValueError, match=r"header\.csv: cannot load as a dataset \(.*no data"):
        _task(tmp_path / "header.csv", tmp_path)
    (tmp_path / "no_data").mkdir()
    with pytest.raises(ValueError, match=r"no_data: no data files"):
        _task(tmp_path / "no_data", tmp_path)


def test_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "a", "answer": "1"}\n{"question": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8"):
        _task(path, tmp_path)
    # Parquet string columns are read without a check; the bad text surfaces when rows are read.
    text = pa.array([b"caf\xe9", b"ok"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"question": text, "answer": ["1", "2"]}), tmp_path / "latin1.parquet")
    with pytest.raises(ValueError, match=r"latin1\.parquet:train: text that is not UTF-8"):
        _task(tmp_path / "latin1.parquet", tmp_path)
    with pytest.raises(ValueError, match=r"latin1\.parquet: text that is not UTF-8"):
        JsonlTask(str(tmp_path / "latin1.parquet"))


def test_unreadable_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl: cannot load as a dataset \("):
        _task(path, tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt: unknown data file type"):
        _task(tmp_path / "notes.txt", tmp_path)


def test_missing_field(tmp_path: Path) -> None:
    datasets.Dataset.from_list([{"question": "q"}]).save_to_disk(tmp_path / "no_answer")
    with pytest.raises(
        ValueError, match=r"no_answer:train: missing field 'answer' \(columns: \['question'\]\)"
    ):
        _task(tmp_path / "no_answer", tmp_path)
    # A JSONL row without the key: the column exists, the value is null in that row.
    _write_jsonl(tmp_path / "gap.jsonl", [{"question": "a", "answer": "1"}, {"question": "b"}])
    with pytest.raises(ValueError, match=r"gap\.jsonl:train row 1: missing field 'answer'"):
        _task(tmp_path / "gap.jsonl", tmp_path)
    _write_jsonl(
        tmp_path / "no_user.jsonl", [{"messages": [{"role": "system", "content": "s"}], "answer": "1"}]
    )
    with pytest.raises(ValueError, match=r"no_user\.jsonl:train row 0: messages have no user turn"):
        _task(tmp_path / "no_user.jsonl", tmp_path)


def test_config_composes_validates_and_builds(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from selfimprove.cli import CONFIG_DIR
    from selfimprove.config import register, validate_targets

    register()
    folder = tmp_path / "data"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", TRAIN)
    _write_jsonl(folder / "test.jsonl", TEST)
    overrides = ["model=tiny", "task=hf_dataset", f"task.path={folder}", f"+task.cache_dir={tmp_path}/c"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    validate_targets(cfg)
    task = instantiate(cfg.task)
    assert isinstance(task, HFDatasetTask) and task.num_heldout == len(TEST)
