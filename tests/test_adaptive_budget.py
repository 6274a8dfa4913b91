"""Adaptive sample budgets (Manvi et al.): n_min samples of each prompt, the rest only where the
model is unsure; on the tiny model's real engine, and through a short training run."""

import pytest

from selfimprove.engine import Engine
from selfimprove.rollout import AdaptiveBudget, OneTurn
from selfimprove.stages import Context
from selfimprove.tasks import ArithmeticTask
from tests.conftest import cfg_of, letter_task, run_loop


@pytest.fixture(scope="module")
def engine():
    from tests.conftest import reset_accelerate

    reset_accelerate()
    return Engine(cfg_of(), train=False)


GEN = {"max_new_tokens": 4, "temperature": 1.0, "weights": "policy"}


def by_prompt(rows):
    out = {}
    for r in rows:
        out.setdefault(r["prompt_id"], []).append(r)
    return out


def test_disagreement_is_about_answers():
    unsure = AdaptiveBudget().unsure
    assert unsure(None, [{"answer": "3"}, {"answer": "4"}])
    assert unsure(None, [{"answer": "3"}, {"answer": None}])
    assert not unsure(None, [{"answer": "3"}, {"answer": "3"}])
    assert not unsure(None, [{"answer": None}, {"answer": None}])  # never an answer: it agrees


def test_sure_prompts_keep_n_min_and_the_first_samples_are_one_turns(engine):
    """The random model never writes a number, so every prompt's answers agree (none): n_min each;
    those rows are OneTurn's with the same seed (the adaptive rollout only adds), and it is seeded."""
    task = ArithmeticTask()
    problems = task.eval_problems(12)
    ctx = Context(engine, task, seed=5)
    rows = AdaptiveBudget(n_min=2)(ctx, problems, 6, GEN)
    groups = by_prompt(rows)
    assert len(groups) == 12 and all(len(g) == 2 for g in groups.values())
    assert all(r["budget"] == 2 for r in rows)
    plain = OneTurn()(ctx, problems, 2, GEN)
    assert [r["completion_ids"] for r in plain] == [r["completion_ids"] for r in rows]


def test_restart_signal_reads_the_models_self_evaluation(engine):
    task = ArithmeticTask()
    problems = task.eval_problems(4)
    rollout = AdaptiveBudget(n_min=1, signal="restart", threshold=0.0)  # always unsure: all get n
    rows = rollout(Context(engine, task, seed=1), problems, 3, GEN)
    assert len(rows) == 12
    for g in by_prompt(rows).values():
        assert [r["sample_idx"] for r in g] == [0, 1, 2] and all(r["budget"] == 3 for r in g)
    again = rollout(Context(engine, task, seed=1), problems, 3, GEN)
    assert [r["completion_ids"] for r in again] == [r["completion_ids"] for r in rows]
    never = AdaptiveBudget(n_min=1, signal="restart", threshold=1.01)
    assert len(never(Context(engine, task, seed=1), problems, 3, GEN)) == 4


@pytest.mark.parametrize("bad", [{"n_min": 0}, {"signal": "vibes"}])
def test_bad_settings(bad):
    with pytest.raises(ValueError):
        AdaptiveBudget(**bad)


def test_a_training_run_with_adaptive_budgets_evaluates_what_it_declares(tmp_path):
    """The loop with rollout=adaptive on answers that disagree (the answer is the completion's first
    letter, which the random model varies): unsure prompts get all n, so training groups differ in
    size; evaluation still samples k per problem and one greedy each (it ran the adaptive rollout,
    kept 2 samples of a sure prompt and pass@k raised)."""
    import json

    from selfimprove.checkpoint import read_table

    run_dir = tmp_path / "run"
    cfg = cfg_of(
        "rollout=adaptive",
        *letter_task(tmp_path),
        "loop.rounds=1",
        "loop.prompts_per_round=8",
        "sampler.n=4",
        "eval.n_problems=6",
        "eval.k=4",
        "eval.k_problems=6",
        "trainer.steps_per_round=1",
        f"run.dir={run_dir}",
        recipe="grpo_oracle",
    )
    run_loop(cfg)

    def table(folder):
        return [r for p in sorted(folder.glob("unit-*.parquet")) for r in read_table(p)]

    trained = by_prompt(table(run_dir / "rounds" / "r0001" / "samples"))
    assert all(r["budget"] == len(g) for g in trained.values() for r in g)
    assert 4 in {len(g) for g in trained.values()}  # the "sample more" branch ran
    (evaluation,) = (run_dir / "rounds" / "r0001" / "eval").iterdir()
    sampled = by_prompt(table(evaluation / "raw-k4"))
    assert len(sampled) == 6 and all(len(g) == 4 for g in sampled.values())
    greedy = table(evaluation / "raw-greedy")
    assert len(greedy) == 6 and len(by_prompt(greedy)) == 6
    assert all("budget" not in r for r in greedy + [r for g in sampled.values() for r in g])
    metrics = json.loads((run_dir / "rounds" / "r0001" / "metrics.json").read_text())
    assert metrics["eval/k"] == 4 and metrics["eval/pass_at_k"] is not None
