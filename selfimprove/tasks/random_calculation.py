"""RandomCalculation as a reasoning task (Wu et al. 2507.10532, §4.3 and App. B): a LaTeX
expression to evaluate step by step, the final value in ``\\boxed{}``, no prefill.

Atoms are integers 0-99, ``\\frac{i}{d}`` (d = 2..9) and ``i^{2}``, ``i^{3}``, one kind in four each
(the paper lists the atoms, not their mix; i is 0-99 throughout). Level k combines level j and level
k-1-j (j < ceil(k/2)) with + - \\times \\div, operands swapped w.p. 0.5, and only the operands of
\\times and \\div parenthesized: the tree and streams are `arithmetic.random_tree` and `ArithmeticTask`'s.
So "a - (b + c)" renders "a - b + c", and the label is the *rendered string*'s value (latex2sympy),
kept when it is finite, written with 15 significant digits as in the paper (more for numbers past 1e9).

Graded by the math grader (math-verify): 1.0 when equal; otherwise the paper's partial reward
r = 1 - 0.5 min(|a-b|, 1) - 0.5 min(|a-b|/(|b|+1e-6), 1), capped just below 1 so it never counts as
correct (``partial=False``: 0.0). Needs the ``[math]`` extra.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction
from functools import lru_cache

from selfimprove.tasks.arithmetic import MAX_DEPTH, ArithmeticTask, random_tree
from selfimprove.tasks.base import Problem, canonical_number, numeric_reward
from selfimprove.tasks.math_grader import MathGrader
from selfimprove.tasks.views import commuted, first_distinct, render

PROMPT = "Evaluate this LaTeX numerical expression step-by-step and give the final value within \\boxed{}: "
LATEX_OPS = {"+": "+", "-": "-", "*": "\\times", "/": "\\div"}
_MAX_DRAWS = 10_000
_LATEX_TOKEN = re.compile(r"\\frac\{\d+\}\{\d+\}|\d+\^\{\d+\}|\d+|\\times|\\div|[-+()]")
# the instruction said another way: views keep the expression (or its commuted form)
REWORDINGS = (
    "Compute the value of this LaTeX expression step by step and put the final value in \\boxed{}: ",
    "Work out this LaTeX expression step by step; give the final value within \\boxed{}: ",
)

# A tree: an atom's LaTeX, or (op, left, right) with op in "+-*/".
Node = str | tuple[str, "Node", "Node"]


def latex_atom(rng: random.Random) -> str:
    """One atom: an integer, a fraction, a square or a cube, each w.p. 1/4."""
    kind = rng.randrange(4)
    i = rng.randint(0, 99)
    if kind == 0:
        return str(i)
    if kind == 1:
        return f"\\frac{{{i}}}{{{rng.randint(2, 9)}}}"
    return f"{i}^{{{kind}}}"  # kind 2: a square, 3: a cube


def render_latex(node: Node) -> str:
    """The paper's rendering: only compound operands of \\times and \\div get parentheses."""
    if isinstance(node, str):
        return node
    op, left, right = node
    parts = []
    for child in (left, right):
        text = render_latex(child)
        parts.append(f"({text})" if op in "*/" and isinstance(child, tuple) else text)
    return f"{parts[0]} {LATEX_OPS[op]} {parts[1]}"


@lru_cache(maxsize=4096)
def evaluate_latex(text: str) -> Fraction | None:
    """The exact value of a rendered expression, parsed from the string itself; None when it is not a
    finite number (a division by zero somewhere)."""
    from latex2sympy2_extended import latex2sympy

    value = latex2sympy(text).doit()
    return Fraction(int(value.p), int(value.q)) if value.is_Rational else None


class RandomCalculationTask(ArithmeticTask):
    """RandomCalculation problems of one ``level`` (1..20 operators); train and held-out streams are
    `ArithmeticTask`'s (seeded per index, split by a stable hash of the expression). ``timeout`` and
    ``fallback`` are the math grader's (see :class:`~selfimprove.tasks.math_grader.MathGrader`)."""

    def __init__(
        self,
        level: int = 2,
        seed: int = 0,
        heldout_fraction: float = 0.34,
        partial: bool = True,
        timeout: int = 5,
        fallback: str = "last_number",
    ) -> None:
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= MAX_DEPTH:
            raise ValueError(f"random_calculation: level must be an integer in 1..{MAX_DEPTH}, got {level!r}")
        super().__init__(
            level=f"depth{level}",
            seed=seed,
            heldout_fraction=heldout_fraction,
            prefill=False,
            template=PROMPT + "{expr}",
        )
        self.grader = MathGrader(timeout, fallback, wanted_by="task=random_calculation")
        self.partial = partial
        self.max_views = 2  # the commuted form, the instruction reworded (`views`)

    def _sample(self, rng: random.Random) -> str:
        for _ in range(_MAX_DRAWS):
            text = render_latex(random_tree(rng, self.depth, latex_atom))
            if evaluate_latex(text) is not None:  # a division by zero: redraw, as in the paper
                return text
        raise RuntimeError(f"could not draw a finite expression for level {self.depth}")

    def _problem(self, problem_id: str, expr: str) -> Problem:
        value = evaluate_latex(expr)
        # 15 significant digits (the paper), and never fewer than 6 decimal places: math-verify rounds
        # to 6 places before comparing, so a shorter label would fail the exact answer of a big number
        whole = len(str(abs(value.numerator) // value.denominator))
        answer = canonical_number(value, digits=max(15, whole + 6))
        return Problem(
            id=problem_id,
            messages=[{"role": "user", "content": self.template.replace("{expr}", expr)}],
            prefill="",
            answer=answer,
            reference=f"${expr} = \\boxed{{{answer}}}$",
        )

    def commuted(self, expr: str) -> str | None:
        """The LaTeX expression with the operands of + (terms) or \\times (factors) in another order;
        None when none can move ("a - b", "a \\div b")."""
        tokens = _LATEX_TOKEN.findall(expr)
        if "".join(tokens) != expr.replace(" ", ""):  # not this task's rendering: no view
            return None
        out = commuted(tokens, ("+", "-"), ("\\times", "\\div"), frozenset(LATEX_OPS.values()))
        return None if out is None else render(out, tight=())

    def views(self, problem: Problem, k: int, rng: random.Random) -> list[Problem]:
        """The commuted expression (where there is one), then the reworded instruction with the
        expression and with its commuted form: up to ``k``, at least two distinct."""
        expr = self.expression(problem)
        swapped = self.commuted(expr)
        asked = [PROMPT + swapped] if swapped else []
        asked += [REWORDINGS[0] + expr, REWORDINGS[1] + expr]
        asked += [REWORDINGS[0] + swapped] if swapped else []
        return first_distinct(problem, [(question, "") for question in asked], k)

    def extract_answer(self, completion: str) -> str | None:
        """The math grader's canonical key of the final answer: what votes group by."""
        return self.grader.answer(completion)

    def reward(self, completion: str, problem: Problem) -> float:
        if self.grader.reward(completion, problem.answer) == 1.0:
            return 1.0
        value = self.grader.value(completion) if self.partial else None
        if value is None:
            return 0.0
        return min(numeric_reward(value, float(problem.answer)), 1.0 - 1e-6)
