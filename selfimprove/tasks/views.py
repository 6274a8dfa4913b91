"""Views of arithmetic problems: equivalent forms made from the question's text alone (Co-rewarding 2508.00410, Self-Harmony 2511.01191).

They encode what the task knows about its operators: that + and × commute (any order of a sum's terms,
or of a product's factors, with a positive term or a multiplied factor first, has the same value), that
a + b = (a + k) + (b − k) and a × b = (a + k) × b − k × b, and that "What is the sum of 38 and 6?" asks
what "38 + 6" does. No view reads an answer: a consistent wrong rule (38 + 6 = 104, roughly a + bb)
answers such forms differently, the right one the same.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from selfimprove.tasks.base import Problem, view_of

# (question or None: the task's own template around the form, the expression the prefill writes)
Form = tuple[str | None, str]

SUM_WORDINGS = ("What is the sum of {a} and {b}?", "Add {b} to {a}.")
PRODUCT_WORDINGS = ("What is the product of {a} and {b}?", "Multiply {a} by {b}.")
EXPRESSION_WORDINGS = ("Compute {expr}.", "Evaluate {expr}.", "Calculate {expr}.")


def split_top(
    tokens: Sequence[str], ops: tuple[str, str], operators: frozenset[str]
) -> list[tuple[str, list[str]]]:
    """(operator, operand tokens) at nesting depth 0, split at the binary ``ops`` (a sign after an
    operator or "(" is unary); the first operand carries ``ops[0]``."""
    parts: list[tuple[str, list[str]]] = [(ops[0], [])]
    depth, prev = 0, None
    for token in tokens:
        depth += (token == "(") - (token == ")")
        binary = prev is not None and prev not in operators and prev != "("
        if depth == 0 and token in ops and binary:
            parts.append((token, []))
        else:
            parts[-1][1].append(token)
        prev = token
    return parts


def _reordered(parts: list[tuple[str, list[str]]], positive: str) -> list[str] | None:
    """The operands in reverse order, the ``positive`` ones (+ terms, × factors) first so the form
    starts with one: same value for a chain of + and − (or × and ÷). None when none is positive."""
    flipped = parts[::-1]
    ordered = [p for p in flipped if p[0] == positive] + [p for p in flipped if p[0] != positive]
    return _flat(ordered) if ordered[0][0] == positive else None


def _flat(parts: list[tuple[str, list[str]]]) -> list[str]:
    """The tokens of (operator, operand) parts, the first operator left out."""
    out = list(parts[0][1])
    for op, operand in parts[1:]:
        out += [op, *operand]
    return out


def commuted(
    tokens: list[str], sums: tuple[str, str], products: tuple[str, str], operators: frozenset[str]
) -> list[str] | None:
    """The expression with its top-level terms reordered, else the factors of its first term that can
    be; None when no reordering gives another form ("a - b", "a / b")."""
    terms = split_top(tokens, sums, operators)
    if len(terms) > 1 and (out := _reordered(terms, sums[0])) is not None and out != tokens:
        return out
    for i, (op, term) in enumerate(terms):
        factors = split_top(term, products, operators)
        new = _reordered(factors, products[0]) if len(factors) > 1 else None
        if new is not None and new != term:
            return _flat([*terms[:i], (op, new), *terms[i + 1 :]])
    return None


def render(tokens: Sequence[str], tight: tuple[str, ...] = ("^",)) -> str:
    """Tokens as the tasks write them: spaced binary operators, "(x)" and "7^2" without spaces."""
    text = " ".join(tokens).replace("( ", "(").replace(" )", ")")
    for op in tight:
        text = text.replace(f" {op} ", op)
    return text


def simple_forms(expr: str, rng: random.Random) -> list[Form]:
    """The forms of "a + b" or "a * b" (one-digit or two-digit operands): commuted, two shifted splits
    (k drawn in 1..9), two wordings (with the original equation as the prefill)."""
    a, op, b = expr.split()
    k1, k2 = rng.sample(range(1, 10), 2)
    if op == "+":
        shifted = [f"({a} + {k}) + ({b} - {k})" for k in (k1, k2)]
        wordings = SUM_WORDINGS
    else:
        shifted = [f"({a} + {k}) * {b} - {k} * {b}" for k in (k1, k2)]
        wordings = PRODUCT_WORDINGS
    # the second shift is last: it stands in for the commuted form where a == b
    return [
        (None, f"{b} {op} {a}"),
        (None, shifted[0]),
        *[(w.format(a=a, b=b), expr) for w in wordings],
        (None, shifted[1]),
    ]


def expression_forms(expr: str, swapped: str | None) -> list[Form]:
    """The forms of a longer expression: commuted (``swapped``, when there is one), three wordings."""
    return ([(None, swapped)] if swapped else []) + [(w.format(expr=expr), expr) for w in EXPRESSION_WORDINGS]


def first_distinct(problem: Problem, forms: list[tuple[str, str]], k: int) -> list[Problem]:
    """The first ``k`` (question, prefill) forms that ask something the problem (and the forms before)
    did not, as views of it."""
    seen = {(problem.messages[-1]["content"], problem.prefill)}
    out = []
    for form in forms:
        if form not in seen and len(out) < k:
            seen.add(form)
            out.append(view_of(problem, *form))
    return out
