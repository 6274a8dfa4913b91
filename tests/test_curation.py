"""Curated retraining (Ferbach et al. 2407.09499) through the selector itself: the one-round value by
Monte Carlo, the temperature, Plackett–Luce without replacement, real-data mixing (arithmetic and JSONL
references), and the config error for a task with no references, in-process and from the CLI."""

import json
import random
from collections import Counter

import pytest
from conftest import TINY, cfg_of, reset_accelerate, run_cli

from selfimprove.engine import Engine
from selfimprove.select import Curation, curation_probs
from selfimprove.stages import Context
from selfimprove.tasks import ArithmeticTask, JsonlTask


def _ctx(seed: int = 0) -> Context:
    return Context(engine=None, task=None, seed=seed)  # no real data: no engine, no task


def _groups(outcomes: list[list[int]], rewards: list[float]) -> list[dict]:
    """Rows of prompts whose samples have the given outcomes; score/r = the outcome's reward."""
    return [
        {"prompt_id": f"p{p}", "sample_idx": k, "outcome": x, "score/r": rewards[x]}
        for p, xs in enumerate(outcomes)
        for k, x in enumerate(xs)
    ]


def _fractions(rows: list[dict], n_outcomes: int) -> list[float]:
    counts = Counter(r["outcome"] for r in rows)
    return [counts[x] / len(rows) for x in range(n_outcomes)]


def test_one_round_of_curation_matches_methods_section_4():
    # p0 = [.5, .5], r = [0, 1], K = 2: the curated distribution p1 = [.3845, .6155]
    rng, n = random.Random(7), 20000
    rows = _groups([rng.choices([0, 1], k=2) for _ in range(n)], [0.0, 1.0])
    picked = Curation(score="r")(rows, _ctx(seed=3))
    assert len(picked) == n and len({r["prompt_id"] for r in picked}) == n  # one per prompt
    assert all(r["source"] == "policy" for r in picked)
    assert _fractions(picked, 2) == pytest.approx([0.3845, 0.6155], abs=0.012)  # ~3.5 sigma


@pytest.mark.parametrize("temperature, top", [(1.0, 0.7311), (0.01, 1.0), (100.0, 0.5025)])
def test_temperature_scales_the_reward(temperature, top):
    rows = _groups([[0, 1]] * 10000, [0.0, 1.0])  # every prompt: one of each
    picked = Curation(score="r", temperature=temperature)(rows, _ctx())
    assert _fractions(picked, 2)[1] == pytest.approx(top, abs=0.015)
    assert curation_probs([0.0, 1.0], 1e-3) == [0.0, 1.0]  # T -> 0: the argmax
    assert curation_probs([0.0, 1.0], 1e6) == pytest.approx([0.5, 0.5])  # T large: uniform


def test_plackett_luce_picks_distinct_rows_and_minus_inf_last():
    rows = _groups([[0, 1, 2, 3, 4]] * 200, [0.0, 1.0, 2.0, float("-inf"), 0.5])
    picked = Curation(score="r", per_prompt=3)(rows, _ctx())
    by_prompt = Counter(r["prompt_id"] for r in picked)
    assert set(by_prompt.values()) == {3}
    assert len({(r["prompt_id"], r["sample_idx"]) for r in picked}) == len(picked)
    assert all(r["outcome"] != 3 for r in picked)  # -inf: drawn only when nothing else is left
    everything = Curation(score="r", per_prompt=9)(rows, _ctx())
    assert len(everything) == len(rows)
    assert Curation(score="r")(rows, _ctx(1)) == Curation(score="r")(rows, _ctx(1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"synthetic_to_real": 0.0}, "synthetic_to_real"),
        ({"per_prompt": 0}, "per_prompt"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Curation(score="r", **kwargs)


@pytest.fixture(scope="module")
def engine():
    reset_accelerate()
    return Engine(cfg_of(), train=False)


def _sampled(n_prompts: int) -> list[dict]:
    return _groups([[0, 1]] * n_prompts, [0.0, 1.0])


@pytest.mark.parametrize("lam, n_real", [(2.0, 5), (0.5, 20), (float("inf"), 0), (None, 0)])
def test_real_rows_are_mixed_at_synthetic_to_real(engine, lam, n_real):
    task = ArithmeticTask()
    selector = Curation(score="r", synthetic_to_real=lam)
    out = selector(_sampled(10), Context(engine, task, seed=5))
    real = [r for r in out if r.get("source") == "real"]
    assert len(out) - len(real) == 10 and len(real) == n_real
    eos = engine.tokenizer.eos_token_id
    for row in real:
        problem = task.train_problem(int(row["prompt_id"].removeprefix("real/train-")))
        assert row["prompt_ids"] == engine.sampler.encode(problem)
        assert row["completion"] == task.reference_completion(problem) == problem.answer
        assert row["completion_ids"][-1] == eos and eos not in row["completion_ids"][:-1]
        assert engine.tokenizer.decode(row["completion_ids"][:-1]) == row["completion"]
        assert row["correct"] and row["answer"] == row["target"] == problem.answer
        assert row["messages"] == problem.messages and row["prefill"] == problem.prefill
    if n_real:
        again = selector(_sampled(10), Context(engine, task, seed=5))
        assert again == out  # same seed, same rows
        other = selector(_sampled(10), Context(engine, task, seed=6))
        assert [r["prompt_id"] for r in other if r["source"] == "real"] != [r["prompt_id"] for r in real]


def _jsonl(tmp_path, n: int = 30):
    path = tmp_path / "q.jsonl"
    rows = [
        {"question": f"What is {i} + 2?", "answer": str(i + 2), "solution": f"{i} + 2 = {i + 2}"}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_task_needs_a_reference_field_for_real_data(tmp_path, engine):
    path = _jsonl(tmp_path)
    plain = JsonlTask(str(path))
    with pytest.raises(ValueError, match="reference_field") as err:
        Curation(score="r", synthetic_to_real=1.0).check(plain)
    assert "JsonlTask" in str(err.value) and "synthetic_to_real=null" in str(err.value)
    Curation(score="r", synthetic_to_real=None).check(plain)
    Curation(score="r", synthetic_to_real=float("inf")).check(plain)

    task = JsonlTask(str(path), reference_field="solution")
    selector = Curation(score="r", synthetic_to_real=1.0)
    selector.check(task)
    real = [r for r in selector(_sampled(4), Context(engine, task, seed=0)) if r["source"] == "real"]
    assert len(real) == 4
    for row in real:
        i = int(row["messages"][-1]["content"].split()[2])
        assert row["completion"] == f"{i} + 2 = {i + 2}"
        assert row["completion_ids"][-1] == engine.tokenizer.eos_token_id


def test_cli_refuses_curation_with_real_data_on_a_task_without_references(tmp_path):
    # The tiny recipe (sharpen_sft) already writes score/self_certainty: adding the verifier again
    # (+verifier@verifiers.self_certainty=...) is a Hydra error of its own.
    args = [*TINY, f"run.dir={tmp_path}/run", "selector=curation", "selector.score=self_certainty"]
    args += ["task=jsonl", f"task.path={_jsonl(tmp_path)}", "eval.n_problems=2"]
    proc = run_cli(["train", *args], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("config error: selector:")
    assert "synthetic_to_real" in line and "JsonlTask" in line and "reference_field" in line
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run starts
