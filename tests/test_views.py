"""Views (issue 30; Co-rewarding 2508.00410, Self-Harmony 2511.01191): a problem asked several ways must get one answer.

The tasks' views (same value, never read from the answer), the views rollout's rows, the cross-view
rewards by hand, the ranking that motivates them (a consistent wrong rule, a + bb, beats the right one
under label_free's reward and loses under every cross-view reward), label-free model selection by view
agreement, the config errors, and one tiny loop run for the plumbing.
"""

import dataclasses
import json
import math
import random
import re

import pytest
from conftest import cfg_of, run_loop

from selfimprove.compose import check
from selfimprove.errors import ConfigError
from selfimprove.evaluate import unlabelled_summary
from selfimprove.metrics import view_agreement
from selfimprove.rollout import OneTurn, Views, check_views
from selfimprove.select.advantage import GroupAdvantage, cross_prompt_surprisal
from selfimprove.select.filters import by_prompt
from selfimprove.stages import Context
from selfimprove.tasks import ArithmeticTask, DyckTask, JsonlTask
from selfimprove.tasks.arithmetic import evaluate_expression
from selfimprove.verify import CrossLabel, Harmony, MajorityAgreement, ViewMajority

# --- the tasks' views -----------------------------------------------------------------------------


def _value(task: ArithmeticTask, view) -> object:
    """A view's value from what it asks: its prefill's equation, or its question through the template
    (None for a wording without a prefill: those are checked by hand below)."""
    if view.prefill:
        return evaluate_expression(view.prefill.removesuffix(" = "))
    question = view.messages[-1]["content"]
    worded = re.fullmatch(r"(?:Compute|Evaluate|Calculate) (.*)\.", question)
    if worded:
        return evaluate_expression(worded.group(1))
    try:
        return evaluate_expression(task.expression(view))
    except ValueError:
        return None


@pytest.mark.parametrize("level", ["add_2d_1d", "add_1d", "mul_1d", "depth2", "depth4"])
@pytest.mark.parametrize("prefill", [True, False])
def test_arithmetic_views_ask_the_same_value_without_the_answer(level, prefill):
    task = ArithmeticTask(level=level, prefill=prefill)
    for index in range(30):
        problem = task.train_problem(index)
        blind = dataclasses.replace(problem, answer="not read")  # a view is made from the question alone
        views = task.views(blind, task.max_views, random.Random(index))
        again = task.views(problem, task.max_views, random.Random(index))
        assert views == [dataclasses.replace(v, answer="not read") for v in again]
        assert len(views) == task.max_views == (3 if level.startswith("depth") else 4)
        asked = {(v.messages[-1]["content"], v.prefill) for v in views}
        assert len(asked) == len(views) and (problem.messages[-1]["content"], problem.prefill) not in asked
        assert all(v.id == problem.id and v.reference is None for v in views)
        values = [_value(task, v) for v in views]
        assert values[0] is not None and set(values) - {None} == {
            evaluate_expression(task.expression(problem))
        }


def test_arithmetic_views_by_hand():
    task = ArithmeticTask(level="add_2d_1d")
    problem = task._problem("train-0", "38 + 6")
    views = task.views(problem, 4, random.Random(0))
    k = int(views[1].prefill.split(" + ")[1].rstrip(")"))
    assert [(v.messages[0]["content"], v.prefill) for v in views] == [
        ("What is 6 + 38?", "6 + 38 = "),
        (f"What is (38 + {k}) + (6 - {k})?", f"(38 + {k}) + (6 - {k}) = "),
        ("What is the sum of 38 and 6?", "38 + 6 = "),  # a wording keeps the original equation
        ("Add 6 to 38.", "38 + 6 = "),
    ]
    same = task.views(task._problem("train-1", "3 + 3"), 4, random.Random(0))  # commuting gives nothing new
    assert len(same) == 4 and all("3 + 3?" not in v.messages[0]["content"] for v in same[:1])
    assert task.commuted("10 - 3 + 2") == "2 + 10 - 3" and task.commuted("(3 + 2) * 7^2") == "7^2 * (3 + 2)"
    assert task.commuted("10 - 3") is None and task.commuted("8 / 2") is None


def test_random_calculation_views_commute_in_latex():
    pytest.importorskip("latex2sympy2_extended", reason="the [math] extra is not installed")
    from selfimprove.tasks import RandomCalculationTask
    from selfimprove.tasks.random_calculation import PROMPT, evaluate_latex

    task = RandomCalculationTask(level=3)
    assert task.commuted("\\frac{7}{2} \\times (3 + 4^{2})") == "(3 + 4^{2}) \\times \\frac{7}{2}"
    for index in range(20):
        problem = task.train_problem(index)
        views = task.views(problem, 2, random.Random(0))
        assert len(views) == 2 and all(v.prefill == "" for v in views)
        for v in views:
            expr = v.messages[-1]["content"].split(": ", 1)[1]
            assert evaluate_latex(expr) == evaluate_latex(task.expression(problem))
        swapped = task.commuted(task.expression(problem))
        assert (views[0].messages[-1]["content"] == PROMPT + swapped) if swapped else True


def _jsonl(tmp_path, rows: list) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_data_views_field(tmp_path, capsys):
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(20)]
    rows[0]["views"] = ["Add 1 to 0.", "What is 1 + 0?"]
    rows[1]["views"] = None  # null: no views, like a missing field
    task = JsonlTask(_jsonl(tmp_path, rows), views_field="views", heldout_fraction=0.0)
    assert task.max_views == 2
    assert capsys.readouterr().err.count("19 of 20 row(s) have no 'views'") == 1  # counted, said once
    problem = next(
        p for p in map(task.train_problem, range(20)) if p.messages[0]["content"] == "What is 0 + 1?"
    )
    views = task.views(problem, 1, random.Random(0))
    assert [v.messages[0]["content"] for v in views] == ["Add 1 to 0."] and views[0].id == problem.id
    other = next(
        p for p in map(task.train_problem, range(20)) if p.messages[0]["content"] != "What is 0 + 1?"
    )
    assert task.views(other, 2, random.Random(0)) == []
    rows[3]["views"] = ["fine", 7]
    with pytest.raises(ValueError, match=r"data.jsonl:4: field 'views' must be a list of non-empty strings"):
        JsonlTask(_jsonl(tmp_path, rows), views_field="views")
    assert JsonlTask(_jsonl(tmp_path, rows)).max_views == 0  # no views_field: no views


def test_hf_dataset_views_field(tmp_path):
    from selfimprove.tasks import HFDatasetTask

    rows = [{"question": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(10)]
    rows[4]["views"] = ["Add 2 to 4."]
    path = _jsonl(tmp_path, rows)
    task = HFDatasetTask(path, views_field="views", heldout_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    problem = next(
        p for p in map(task.train_problem, range(10)) if p.messages[0]["content"] == "What is 4 + 2?"
    )
    assert (
        task.max_views == 1
        and task.views(problem, 1, random.Random(0))[0].messages[0]["content"] == "Add 2 to 4."
    )
    rows[5]["views"] = [""]  # an empty rephrasing (a column of mixed types is refused by `datasets` itself)
    with pytest.raises(ValueError, match=r"data.jsonl:train row 5: field 'views' must be a list"):
        HFDatasetTask(_jsonl(tmp_path, rows), views_field="views", cache_dir=str(tmp_path / "cache"))


# --- the rollout ----------------------------------------------------------------------------------


class _Engine:
    """Generates "<prompt length>" for each prompt; encodes a problem as its question's and prefill's
    characters (enough to tell the forms apart)."""

    class sampler:  # noqa: N801
        @staticmethod
        def encode(problem):
            return [ord(c) for c in problem.messages[-1]["content"] + problem.prefill]

    def generate(self, prompts, weights="policy", seed=0, **gen):
        self.calls = getattr(self, "calls", 0) + 1
        return [{"completion": str(len(p)), "completion_ids": [1]} for p in prompts]


def test_views_rollout_splits_samples_across_forms():
    task = ArithmeticTask(level="add_2d_1d")
    engine = _Engine()
    problems = [task.train_problem(i) for i in range(3)]
    rows = Views(views=1)(Context(engine, task, seed=0), problems, 5, {})
    assert engine.calls == 1 and len(rows) == 15  # one generate call, n rows per problem
    for problem, group in zip(problems, [rows[i : i + 5] for i in range(0, 15, 5)]):
        assert [r["view"] for r in group] == [0, 1, 0, 1, 0] and [r["sample_idx"] for r in group] == list(
            range(5)
        )
        assert {r["prompt_id"] for r in group} == {problem.id}
        assert group[0]["prefill"] == problem.prefill != group[1]["prefill"]  # the commuted equation
    with pytest.raises(ValueError, match="sampler.n=2 cannot give each of a problem's 3 forms"):
        Views(views=2)(Context(engine, task, seed=0), problems, 2, {})


def test_views_config_errors():
    with pytest.raises(ValueError, match="views=1: task DyckTask makes no views"):
        Views(views=1).check(DyckTask())
    with pytest.raises(ValueError, match="views=5: task ArithmeticTask makes at most 4 views"):
        Views(views=5).check(ArithmeticTask())
    with pytest.raises(ValueError, match="needs rollout=views"):
        check_views(OneTurn(), 8, "unlabelled/view_agreement")
    with pytest.raises(ConfigError, match="sampler.n=1 cannot give"):
        check(cfg_of("sampler.n=1", "eval.unlabelled_problems=2", recipe="label_free_views"))
    with pytest.raises(ConfigError, match="eval.select_by=unlabelled/view_agreement .* needs rollout=views"):
        check(cfg_of("eval.select_by=unlabelled/view_agreement", recipe="label_free"))
    from selfimprove.loop import Loop

    cfg = cfg_of("task=dyck", "eval.unlabelled_problems=2", recipe="label_free_views")
    with pytest.raises(ConfigError, match="rollout: views=1: task DyckTask makes no views"):
        Loop(cfg)  # refused against the task, before the run folder or the model


# --- cross-view rewards ---------------------------------------------------------------------------


def _rows(problem: str, forms: list[list]) -> list[dict]:
    return [
        {"prompt_id": problem, "view": v, "answer": a} for v, answers in enumerate(forms) for a in answers
    ]


def test_cross_view_rewards_by_hand():
    # the hand-computed check: the original's majority is 104, the view's 44; 44 is frequent under both
    rows = _rows("p", [["104", "104", "104", "44"], ["44", "44", "44", "91"]])
    assert Harmony().score(rows) == [0, 0, 0, 1, 1, 1, 1, 0]  # HM(44) = 2·.25·.75/1 = .375, the rest 0
    assert CrossLabel().score(rows) == [0, 0, 0, 1, 0, 0, 0, 0]  # original by the view's 44, view by 104
    assert ViewMajority().score(rows) == CrossLabel().score(rows)  # one view: the same reward
    three = _rows("q", [["7", "7", None], ["7", "3", "3"], ["3", "7", "7"]])
    # pooled others: form 0 sees [7,3,3,3,7,7] -> 7 (tie, first seen); form 1 sees [7,7,None,3,7,7] -> 7
    assert CrossLabel().score(three) == [1, 1, 0, 1, 0, 0, 0, 1, 1]
    # other forms' majorities: form 0 <- (3, 7): 7 gets 1/2; form 1 <- (7, 7); form 2 <- (7, 3)
    assert ViewMajority().score(three) == [0.5, 0.5, 0, 1, 0, 0, 0.5, 0.5, 0.5]
    # HM(7) = 3/(1/(2/3) + 1/(1/3) + 1/(2/3)) = .5 > HM(3) = 3/(inf) = 0 (never in form 0)
    assert Harmony().score(three) == [1, 1, 0, 1, 0, 0, 0, 1, 1]
    alone = _rows("r", [["5", "5", "6"]])  # a problem asked one way: no other form to agree with
    assert CrossLabel().score(alone) == ViewMajority().score(alone) == [0, 0, 0]
    assert Harmony().score(alone) == [1, 1, 0]  # HM of one frequency: that form's majority
    ctx = Context(None, None, seed=0)
    Harmony()(_rows("s", [["1", "1"], [None, "1"]]), ctx)
    assert ctx.logged["unanswered_views"] == 0.5  # a view the task cannot parse: counted, not fatal


def _policy(rule, problems: list[tuple[int, int]], per_form: int = 4) -> list[dict]:
    """Rows of a "policy" that answers every form of a + b (the original, then commuted b + a) by
    `rule`, the same answer every sample: agreement within each form is perfect."""
    rows = []
    for a, b in problems:
        for view, (x, y) in enumerate([(a, b), (b, a)]):
            rows += [{"prompt_id": f"{a}+{b}", "view": view, "answer": str(rule(x, y))}] * per_form
    return [dict(r) for r in rows]


def test_a_consistent_wrong_rule_ranks_below_the_right_one():
    # sums that collide across prompts (all 44) and a wrong rule that does not: 38 + 66 = 104, ...
    problems = [(38, 6), (39, 5), (40, 4), (41, 3)]
    right = _policy(lambda a, b: a + b, problems)
    wrong = _policy(lambda a, b: a + int(f"{b}{b}"), problems)  # a + bb: 38 + 6 = 104, 6 + 38 = 3844

    def label_free(rows):  # recipes/label_free.yaml's row reward: EMPO share + 0.3 × surprisal
        agreement = MajorityAgreement().score(rows)
        return [s + 0.3 * b for s, b in zip(agreement, cross_prompt_surprisal(rows, by_prompt(rows)))]

    def mean(xs):
        return sum(xs) / len(xs)

    originals = [[r for r in rows if r["view"] == 0] for rows in (right, wrong)]
    # label_free (one form per prompt, as it samples): both agree perfectly within a prompt, and the
    # wrong rule's answers differ across prompts (104, 94, 84, 74) where the right ones all read 44, so
    # the wrong rule is the more "informative" one and earns more
    assert mean(label_free(originals[1])) > mean(label_free(originals[0]))
    for scorer in (Harmony(), CrossLabel(), ViewMajority()):
        assert mean(scorer.score(right)) == 1.0 and mean(scorer.score(wrong)) == 0.0, scorer.name
    # and model selection by views tells them apart too
    assert unlabelled_summary(right)["unlabelled/view_agreement"] == 1.0
    assert unlabelled_summary(wrong)["unlabelled/view_agreement"] == 0.0


def test_a_gated_surprisal_ranks_the_wrong_rule_below_the_right_one():
    # label_free with views (the majority pooled over both forms) still pays the wrong rule more: half
    # of its samples agree (0.5) but its answers are rare across prompts (0.3 · log 25 ≈ 0.97), while
    # the right answers all read 44 (agreement 1, no bonus). Gated by view_majority, the bonus goes to
    # answers the other form gives, and the wrong rule's is 0.
    problems = [(38, 6), (39, 5), (40, 4), (41, 3)]
    right = _policy(lambda a, b: a + b, problems)
    wrong = _policy(lambda a, b: a + int(f"{b}{b}"), problems)

    def reward_mean(rows, gate):
        for scorer in (MajorityAgreement(), ViewMajority()):
            for row, score in zip(rows, scorer.score(rows)):
                row[f"score/{scorer.name}"] = score
        ctx = Context(None, None, seed=0)
        GroupAdvantage("majority", surprisal_weight=0.3, surprisal_gate=gate)(rows, ctx)
        return ctx.logged["reward_mean"]

    assert reward_mean(right, None) == pytest.approx(1.0)
    assert reward_mean(wrong, None) == pytest.approx(0.5 + 0.3 * math.log(25))
    assert reward_mean(right, "view_majority") == pytest.approx(1.0)
    assert reward_mean(wrong, "view_majority") == pytest.approx(0.5)


def test_view_agreement_and_the_unlabelled_summary():
    assert (
        view_agreement({"p": {0: ["1", "1", "2"], 1: ["1"], 2: ["2", "2"]}, "q": {0: [None], 1: [None]}})
        == 0.25
    )
    assert view_agreement({"p": {0: ["1"]}}) is None
    rows = _rows("p", [["1", "1"], ["1", "2"]]) + _rows("q", [["3", "3"], ["4", "4"]])
    summary = unlabelled_summary(rows)
    assert summary["unlabelled/view_agreement"] == 0.5
    assert summary["unlabelled/agreement"] == 1.0  # the information terms: original forms only
    one_turn = [{k: v for k, v in r.items() if k != "view"} for r in rows if r["view"] == 0]
    assert "unlabelled/view_agreement" not in unlabelled_summary(one_turn)


# --- the loop ---------------------------------------------------------------------------------------


def test_label_free_views_round_on_the_tiny_model(tmp_path, monkeypatch):
    """The plumbing: training rows carry `view` (both forms), evaluation asks the original forms only,
    and model selection by view agreement reads the unlabelled prompts' forms."""
    import pyarrow.parquet as pq

    # the tiny model never writes a number: a coarse answer (the completion's length mod 3) instead
    monkeypatch.setattr(ArithmeticTask, "extract_answer", lambda self, completion: str(len(completion) % 3))
    run_dir = tmp_path / "run"
    cfg = cfg_of(
        "loop.rounds=1",
        "loop.prompts_per_round=2",
        "sampler.n=4",
        "sampler.max_new_tokens=4",
        "trainer.steps_per_round=1",
        "trainer.micro_batch_size=8",
        "trainer.grad_accum=1",
        "eval.before=false",
        "eval.n_problems=2",
        "eval.batch_size=8",
        "eval.max_new_tokens=4",
        "eval.unlabelled_problems=2",
        "eval.unlabelled_k=2",
        "eval.select_by=unlabelled/view_agreement",
        f"run.dir={run_dir}",
        recipe="label_free_views",
    )
    check(cfg)
    last = run_loop(cfg)
    samples = pq.read_table(run_dir / "rounds" / "r0001" / "scored" / "unit-00000.parquet").to_pylist()
    assert sorted(r["view"] for r in samples) == [0] * 4 + [1] * 4 and "score/harmony" in samples[0]
    evals = [p for p in run_dir.rglob("*.parquet") if "greedy" in str(p)]
    assert evals and all("view" not in pq.read_table(p).column_names for p in evals)
    unlabelled = [
        r for p in run_dir.rglob("*.parquet") if "unlabelled" in str(p) for r in pq.read_table(p).to_pylist()
    ]
    assert sorted(r["view"] for r in unlabelled) == [0] * 4 + [1] * 4  # unlabelled_k of each form
    assert (
        last["unlabelled/view_agreement"] is not None and last["selected/by"] == "unlabelled/view_agreement"
    )
