"""RandomCalculation as a reasoning task (Wu et al. 2507.10532): the recipe, the label from the rendered
string, the paper's prompt and partial reward, seeded and disjoint streams, and its config."""

from __future__ import annotations

import random
import re
from fractions import Fraction

import pytest

pytest.importorskip("math_verify", reason="the [math] extra is not installed")

from hydra.utils import instantiate  # noqa: E402

from selfimprove.tasks import RandomCalculationTask  # noqa: E402
from selfimprove.tasks.arithmetic import random_tree  # noqa: E402
from selfimprove.tasks.base import numeric_reward  # noqa: E402
from selfimprove.tasks.random_calculation import (  # noqa: E402
    PROMPT,
    evaluate_latex,
    latex_atom,
    render_latex,
)
from tests.conftest import cfg_of  # noqa: E402

_ATOM = re.compile(r"^(\d{1,2}|\\frac\{\d{1,2}\}\{[2-9]\}|\d{1,2}\^\{[23]\})$")


def test_paper_reward_values() -> None:
    assert numeric_reward(10.5, 10) == pytest.approx(0.725)
    assert numeric_reward(10, 10) == 1.0
    assert numeric_reward(-3, 2) == 0.0


def test_atoms_and_levels() -> None:
    rng = random.Random(0)
    atoms = [latex_atom(rng) for _ in range(400)]
    assert all(_ATOM.match(a) for a in atoms)
    kinds = {("frac" in a) + 2 * ("^{2}" in a) + 3 * ("^{3}" in a) for a in atoms}
    assert kinds == {0, 1, 2, 3}  # integers, fractions, squares, cubes
    for level in (1, 3, 7):
        tree = random_tree(random.Random(level), level, latex_atom)
        text = render_latex(tree)
        assert len(re.findall(r" (?:\+|-|\\times|\\div) ", text)) == level  # one operator per level


def test_label_comes_from_the_rendered_string() -> None:
    # "a - (b + c)" renders without parentheses; the label is the string's value, not the tree's
    tree = ("-", "10", ("+", "3", "2"))
    assert render_latex(tree) == "10 - 3 + 2" and evaluate_latex("10 - 3 + 2") == 9
    # only compound operands of \times and \div are parenthesized
    assert render_latex(("*", ("+", "1", "2"), r"\frac{3}{4}")) == r"(1 + 2) \times \frac{3}{4}"
    assert render_latex(("/", "5^{2}", ("-", "3", "1"))) == r"5^{2} \div (3 - 1)"
    assert evaluate_latex(r"8 \div 2 \div 2") == 2  # left-associative, like the reader
    assert evaluate_latex(r"\frac{5}{6} \div 7^{2} - 3") == Fraction(-877, 294)
    assert evaluate_latex(r"5 \div (2 - 2)") is None  # a division by zero is redrawn


def test_problems_prompt_and_streams() -> None:
    task = RandomCalculationTask(level=2, seed=3)
    evals = task.eval_problems(30)
    train = [task.train_problem(i) for i in range(60)]
    for p in [*evals, *train]:
        content = p.messages[0]["content"]
        assert content.startswith(PROMPT) and p.prefill == ""
        expr = content[len(PROMPT) :]
        value = evaluate_latex(expr)
        assert value is not None and Fraction(p.answer) == pytest.approx(value, rel=1e-14)
    assert {p.messages[0]["content"] for p in evals}.isdisjoint(p.messages[0]["content"] for p in train)
    assert len({p.messages[0]["content"] for p in evals}) == 30
    again = RandomCalculationTask(level=2, seed=3)
    assert again.eval_problems(30) == evals and again.train_problem(17) == train[17]
    assert RandomCalculationTask(level=2, seed=4).train_problem(17) != train[17]


def test_grading_and_partial_reward() -> None:
    task = RandomCalculationTask(level=1)
    problem = next(p for p in task.eval_problems(40) if Fraction(p.answer).denominator != 1)
    exact = Fraction(problem.answer)
    assert task.reward(task.reference_completion(problem), problem) == 1.0
    assert task.reward(f"Step by step ... \\boxed{{{problem.answer}}}", problem) == 1.0
    near = float(exact) + 0.5
    partial = task.reward(f"\\boxed{{{near}}}", problem)
    assert partial == pytest.approx(numeric_reward(near, float(exact))) and 0 < partial < 1
    assert not task.is_correct(f"\\boxed{{{float(exact) + 1e-4}}}", problem)  # a near miss is never correct
    assert task.reward(r"\boxed{}", problem) == 0.0 and task.reward("no idea", problem) == 0.0
    assert RandomCalculationTask(level=1, partial=False).reward(f"\\boxed{{{near}}}", problem) == 0.0
    # one key per value, whatever the form: what the votes group by
    assert task.extract_answer(r"\boxed{\frac{7}{2}}") == task.extract_answer(r"\boxed{3.5}") == "3.5"


def test_a_big_exact_answer_is_right() -> None:
    """Labels keep 6 decimal places past 1e9: math-verify rounds to 6 places before comparing."""
    task = RandomCalculationTask(level=1)
    problem = task._problem("eval-x", r"99^{3} \times 75^{3} \div 7")
    exact = evaluate_latex(r"99^{3} \times 75^{3} \div 7")
    assert task.reward(f"\\boxed{{\\frac{{{exact.numerator}}}{{{exact.denominator}}}}}", problem) == 1.0


def test_bad_levels_and_config() -> None:
    for level in (0, 21, "2", True):
        with pytest.raises(ValueError, match="level must be an integer in 1..20"):
            RandomCalculationTask(level=level)
    task = instantiate(cfg_of("task=random_calculation", "task.level=3").task)
    assert isinstance(task, RandomCalculationTask) and task.depth == 3


def test_math_grpo_rewards_a_near_miss_over_a_far_one() -> None:
    """math_grpo's reward is the task's (the paper's partial credit): in one group, the exact answer
    beats a near miss, which beats a far miss and no answer, which tie; `correct` alone ties all three."""
    from omegaconf import OmegaConf

    from selfimprove.parts import build_parts
    from selfimprove.rollout import OneTurn

    cfg = cfg_of(recipe="math_grpo")
    parts = build_parts(OmegaConf.to_container(cfg, resolve=True), OneTurn())
    task = instantiate(cfg.task)
    problem = task.eval_problems(1)[0]
    value = float(Fraction(problem.answer))
    completions = [
        f"\\boxed{{{problem.answer}}}",
        f"\\boxed{{{value + 0.5}}}",
        f"\\boxed{{{value + 1e6}}}",
        "?",
    ]
    rows = []
    for i, text in enumerate(completions):
        reward = task.reward(text, problem)
        rows.append(
            {
                "prompt_id": "p",
                "sample_idx": i,
                "completion": text,
                "answer": task.extract_answer(text),
                "reward": reward,
                "correct": task.is_correct(text, problem),
            }
        )
    for scorer in parts.scorers:
        rows = scorer(rows, None)
    assert [r["score/correct"] for r in rows] == [1.0, 0.0, 0.0, 0.0]
    assert rows[0]["score/task_reward"] == 1.0 and 0.5 < rows[1]["score/task_reward"] < 1.0
    assert rows[2]["score/task_reward"] == rows[3]["score/task_reward"] == 0.0
    advantage = {r["sample_idx"]: r["advantage"] for r in parts.selector(rows, None)}
    assert advantage[0] > advantage[1] > advantage[2] == advantage[3]
