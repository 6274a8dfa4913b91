"""Arithmetic tasks: simple additions/multiplications and RandomCalculation-style expressions
(Wu et al., arXiv 2507.10532), with answers computed by a safe exact parser."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from selfimprove.tasks.base import (
    Problem,
    Task,
    canonical_number,
    check_eval_count,
    check_heldout_fraction,
    is_heldout,
    numeric_reward,
)
from selfimprove.tasks.views import commuted, expression_forms, first_distinct, render, simple_forms

# A RandomCalculation tree: an int atom, or (op, left, right) with op in "+-*/^".
Expr = int | tuple[str, "Expr", "Expr"]

SIMPLE_LEVELS = ("add_2d_1d", "add_1d", "mul_1d")
MAX_DEPTH = 20
POWER_PROB = 0.1  # chance that an atom is a small square like "7^2"
_MAX_NESTING = 100  # keeps the recursive-descent parser well below Python's recursion limit
_MAX_POWER_BITS = 100_000  # guards against "9^9^9"-style blow-ups
_TOKEN_RE = re.compile(r"\d+(?:\.\d+)?|[-+*/^()]|(\S)")
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
_MAX_DRAWS = 10_000
# what a completion after the prefill "a + b = " may begin with and still be an answer: a number
_ANSWER_START_RE = re.compile(r"\s*-?(\d+(\.\d*)?(/\d*)?)?")


def _tokenize(text: str) -> list[str]:
    tokens = []
    for match in _TOKEN_RE.finditer(text):  # whitespace matches nothing, so it is skipped
        if match.group(1) is not None:
            raise ValueError(f"unexpected character {match.group(1)!r} at {match.start()}")
        tokens.append(match.group(0))
    return tokens


class _Parser:
    """Recursive descent: expr := term (+|- term)*, term := unary (*|/ unary)*,
    unary := - unary | power, power := primary (^ unary)?, primary := number | ( expr ).
    So ``-2^2 == -4`` and ``^`` is right-associative, as in standard math notation."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.nesting = 0  # every recursion passes through unary(), so bound it there

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ValueError("unexpected end of expression")
        self.pos += 1
        return token

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/"):
            op, rhs = self.take(), self.unary()
            if op == "/" and rhs == 0:
                raise ValueError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def unary(self) -> Fraction:
        self.nesting += 1
        if self.nesting > _MAX_NESTING:
            raise ValueError("expression nested too deeply")
        if self.peek() == "-":
            self.take()
            value = -self.unary()
        else:
            value = self.power()
        self.nesting -= 1
        return value

    def power(self) -> Fraction:
        base = self.primary()
        if self.peek() != "^":
            return base
        self.take()
        exp = self.unary()
        size = abs(exp) * max(base.numerator.bit_length(), base.denominator.bit_length())
        if exp.denominator != 1 or size > _MAX_POWER_BITS:
            raise ValueError(f"unsupported power {base}^{exp}")
        if base == 0 and exp < 0:
            raise ValueError("division by zero")
        return base ** int(exp)

    def primary(self) -> Fraction:
        token = self.take()
        if token == "(":
            value = self.expr()
            if self.take() != ")":
                raise ValueError("expected ')'")
            return value
        if token[0].isdigit():
            return Fraction(token)
        raise ValueError(f"unexpected token {token!r}")


def evaluate_expression(text: str) -> Fraction:
    """Exactly evaluate an arithmetic string (integers/decimals, + - * / ^, parentheses, unary
    minus) without touching Python's evaluator. Raises ``ValueError`` on anything else,
    including division by zero."""
    tokens = _tokenize(text)
    if not tokens:
        raise ValueError("empty expression")
    parser = _Parser(tokens)
    value = parser.expr()
    if parser.peek() is not None:
        raise ValueError(f"unexpected token {parser.peek()!r} after end of expression")
    return value


def render_tree(node: Expr) -> str:
    """Render like the paper: only operands of * and / get parentheses, so the tree
    ``- 10 (+ 3 2)`` renders as "10 - 3 + 2" (value 9). Answers must come from the string."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    if op == "^":
        return f"{render_tree(left)}^{render_tree(right)}"
    parts = []
    for child in (left, right):
        text = render_tree(child)
        if op in "*/" and isinstance(child, tuple) and child[0] != "^":
            text = f"({text})"
        parts.append(text)
    return f"{parts[0]} {op} {parts[1]}"


def _atom(rng: random.Random) -> Expr:
    if rng.random() < POWER_PROB:
        return ("^", rng.randint(2, 12), 2)
    return rng.randint(0, 99)


def random_tree(rng: random.Random, depth: int, atom: Callable[[random.Random], Any] = _atom) -> Any:
    """Level k = L(level j) op R(level k-1-j), j < ceil(k/2), operands swapped w.p. 0.5; level 0 is
    ``atom(rng)`` (RandomCalculation's LaTeX atoms come from `tasks.random_calculation`)."""
    if depth == 0:
        return atom(rng)
    j = rng.randrange(math.ceil(depth / 2))
    left = random_tree(rng, j, atom)
    right = random_tree(rng, depth - 1 - j, atom)
    if rng.random() < 0.5:
        left, right = right, left
    return (rng.choice("+-*/"), left, right)


class ArithmeticTask(Task):
    """Arithmetic problems with a hash-partitioned, never-overlapping train/held-out split."""

    def __init__(
        self,
        level: str = "add_2d_1d",
        seed: int = 0,
        heldout_fraction: float = 0.34,
        prefill: bool = True,
        template: str = "What is {expr}?",
    ) -> None:
        self.level = level
        self.seed = seed
        self.heldout_fraction = check_heldout_fraction(heldout_fraction)
        self.prefill = prefill
        if "{expr}" not in template:
            raise ValueError(f"template must contain '{{expr}}', got {template!r}")
        self.template = template
        self.depth = 0
        if level not in SIMPLE_LEVELS:
            match = re.fullmatch(r"depth(\d+)", level)
            if match is None or not 1 <= int(match.group(1)) <= MAX_DEPTH:
                raise ValueError(
                    f"unknown level {level!r}; expected one of {SIMPLE_LEVELS} "
                    f"or 'depthK' with K in 1..{MAX_DEPTH}"
                )
            self.depth = int(match.group(1))
        # views (tasks/views.py): commuted, two shifted splits and two wordings of "a + b" / "a * b";
        # the commuted form (where there is one) and three wordings of a longer expression
        self.max_views = 3 if self.depth else 4

    def _operands(self) -> tuple[range, range, str]:
        if self.level == "add_2d_1d":
            return range(10, 100), range(10), "+"
        return range(10), range(10), "+" if self.level == "add_1d" else "*"

    def all_expressions(self) -> list[str] | None:
        """Every expression of a finite level, or None for the (huge) depth levels."""
        if self.depth:
            return None
        lhs, rhs, op = self._operands()
        return [f"{a} {op} {b}" for a in lhs for b in rhs]

    def _sample(self, rng: random.Random) -> str:
        if not self.depth:
            lhs, rhs, op = self._operands()
            return f"{rng.choice(lhs)} {op} {rng.choice(rhs)}"
        for _ in range(_MAX_DRAWS):
            expr = render_tree(random_tree(rng, self.depth))
            try:
                evaluate_expression(expr)
            except ValueError:  # division by zero somewhere: redraw, as in the paper
                continue
            return expr
        raise RuntimeError(f"could not draw a finite expression for level {self.level!r}")

    def _problem(self, problem_id: str, expr: str) -> Problem:
        answer = canonical_number(evaluate_expression(expr))
        return Problem(
            id=problem_id,
            messages=[{"role": "user", "content": self.template.replace("{expr}", expr)}],
            prefill=f"{expr} = " if self.prefill else "",
            answer=answer,
            # after the prefill "a + b = " the answer is the whole reply; without it, the equation
            reference=answer if self.prefill else f"{expr} = {answer}",
        )

    def train_problem(self, index: int) -> Problem:
        if index < 0:
            raise ValueError(f"train index must be non-negative, got {index}")
        rng = random.Random(f"{self.seed}:train:{index}")
        for _ in range(_MAX_DRAWS):
            expr = self._sample(rng)
            if not is_heldout(expr, self.heldout_fraction):
                return self._problem(f"train-{index}", expr)
        raise RuntimeError(f"no training expression found for index {index}")

    def eval_problems(self, n: int) -> list[Problem]:
        rng = random.Random(f"{self.seed}:eval")
        space = self.all_expressions()
        if space is not None:
            # Finite level: a seeded shuffle of the whole held-out set is the exhaustive
            # version of "draw, keep held-out, dedupe", and tells us exactly how many exist.
            heldout = [e for e in space if is_heldout(e, self.heldout_fraction)]
            rng.shuffle(heldout)
            source = f"level {self.level!r} (heldout_fraction={self.heldout_fraction})"
            check_eval_count(n, len(heldout), source)
            chosen = heldout[:n]
        else:
            chosen, seen = [], set()
            max_draws = max(_MAX_DRAWS, 50 * n)
            for _ in range(max_draws):
                if len(chosen) >= n:
                    break
                expr = self._sample(rng)
                if expr not in seen and is_heldout(expr, self.heldout_fraction):
                    seen.add(expr)
                    chosen.append(expr)
            source = f"level {self.level!r} (distinct held-out problems found in {max_draws} draws)"
            check_eval_count(n, len(chosen), source)
        return [self._problem(f"eval-{i}", expr) for i, expr in enumerate(chosen)]

    def has_references(self) -> bool:
        return True

    def expression(self, problem: Problem) -> str:
        """The expression a problem of this task asks about, read back from its question through the
        template (a Problem carries no expression of its own); ValueError for another question."""
        pre, _, post = self.template.partition("{expr}")
        content = problem.messages[-1]["content"]
        expr = content[len(pre) : len(content) - len(post)]
        if self.template.replace("{expr}", expr) != content:
            raise ValueError(
                f"problem {problem.id}: {content!r} is not asked with template {self.template!r}"
            )
        return expr

    def commuted(self, expr: str) -> str | None:
        """``expr`` with its terms (or a term's factors) in another order; None when none."""
        out = commuted(_tokenize(expr), ("+", "-"), ("*", "/"), frozenset("+-*/^"))
        return None if out is None else render(out)

    def views(self, problem: Problem, k: int, rng: random.Random) -> list[Problem]:
        """Up to ``k`` forms of the problem (see `max_views` in __init__), each with the prefill
        "{form} = " where the task prefills (a wording keeps the original equation)."""
        expr = self.expression(problem)
        forms = simple_forms(expr, rng) if not self.depth else expression_forms(expr, self.commuted(expr))
        asked = [
            (question or self.template.replace("{expr}", form), f"{form} = " if self.prefill else "")
            for question, form in forms
        ]
        return first_distinct(problem, asked, k)

    def extract_answer(self, completion: str) -> str | None:
        """First number (or a/b fraction) in the completion. Without a prefill the model may
        restate the expression, so only the text after the last '=' is searched then."""
        text = completion
        if not self.prefill and "=" in text:
            text = text.rsplit("=", 1)[1]
        match = _NUMBER_RE.search(text)
        if match is None:
            return None
        numerator, _, denominator = match.group(0).partition("/")
        value = Fraction(numerator)  # "2.83/1": Fraction() reads no decimal in a fraction, so divide here
        if denominator and int(denominator) != 0:  # "x/0" is not a number; keep the numerator
            value /= int(denominator)
        return canonical_number(value)

    def prefix_error(self, problem: Problem, text: str, ended: bool, remaining: int) -> bool:
        """The answer format as a process verifier: after the prefill the reply must begin with a
        number (what `extract_answer` reads), so a prefix whose first non-space character cannot start
        one, or a reply that ends before any digit, is an error. Anything goes after the number; without
        a prefill the model may restate the expression first, so nothing is checked."""
        if not self.prefill:
            return False
        start = _ANSWER_START_RE.match(text)
        has_digit = start is not None and start.group(1) is not None
        if start.end() < len(text) and not has_digit:
            return True  # something other than a number came first
        return ended and not has_digit

    def reward(self, completion: str, problem: Problem) -> float:
        """1.0 for an exact (canonical) match, else the RandomCalculation partial reward,
        capped just below 1 so near-misses never pass ``is_correct``; 0.0 with no number."""
        pred = self.extract_answer(completion)
        if pred is None:
            return 0.0
        if pred == problem.answer:
            return 1.0
        partial = numeric_reward(_to_float(pred), _to_float(problem.answer))
        return min(partial, 1.0 - 1e-6)


def _to_float(text: str) -> float:
    try:
        return float(Fraction(text))
    except OverflowError:  # astronomically large answers: treat as infinitely far away
        return math.inf if not text.startswith("-") else -math.inf
