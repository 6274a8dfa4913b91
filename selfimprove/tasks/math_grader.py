"""Math answers graded by Hugging Face's math-verify (with latex2sympy2_extended), as trl's and open-r1's
accuracy rewards grade them.

Which text is the answer (:func:`final_answer`): the last ``\\boxed{...}`` or ``\\fbox{...}`` (braces
matched, so ``\\boxed{\\frac{1}{2}}`` is whole); without a box, the last GSM8K ``#### n`` line; without
either, the last plain number (``fallback="last_number"``) or nothing (``fallback="none"``). The last
box decides: an empty one, or one that never closes (a cut-off completion), is no answer, never an
earlier box. A reference answer (:meth:`MathGrader.gold`) is read the same way, except that text with
neither a box nor ``####`` is the answer as a whole.

Two answers are equal when math-verify's ``verify(parse(gold), parse(answer))`` says so. Voting needs
more: equal answers written differently must be one *key* ("1/2", "0.5", "\\frac{1}{2}", "\\dfrac12"
are all "0.5"), because majority vote, TTRL/EMPO agreement, maj@k and Borda group rows by the
``answer`` column, which is what ``task.extract_answer`` returns. :meth:`MathGrader.answer` returns
that key: a number's value rounded as math-verify's ``float_rounding`` rounds it (:func:`number_key`),
any other expression as sympy prints it, unparsed text with its spaces removed.

Never a hang: math-verify bounds its parse and each comparison with SIGALRM, which only the main
thread may arm (elsewhere it raises ValueError). Off the main thread :func:`_bounded` arms a
per-thread profile hook that raises math-verify's TimeoutException past the deadline instead. Either
way a timed-out or failing answer is no answer / wrong.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import threading
import time
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction
from functools import lru_cache
from typing import Any, TypeVar

from selfimprove.extras import require

T = TypeVar("T")
FALLBACKS = ("last_number", "none")
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GSM8K = re.compile(r"####[ \t]*([^\n]*)")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_MAX_EXPONENT = 300  # a float key beyond 1e±300 is written in scientific notation, not expanded
_PLACES = Decimal("0.000001")
MAX_BITS = 100_000  # as arithmetic.py's power guard: larger answers are not evaluated (see _bits)


def _no_timeout_notice(record: logging.LogRecord) -> bool:
    """Drops math-verify's "Timeout is disabled" notice: off the main thread `_bounded` sets the limit."""
    return "Timeout is disabled" not in record.getMessage()


def last_box(text: str) -> str | None:
    """Content of the last ``\\boxed{}``/``\\fbox{}``, braces matched (``\\{`` and ``\\}`` are
    literal); "" for an empty box; None when there is no box or the last one never closes."""
    starts = [m.end() for m in _BOX.finditer(text)]
    if not starts:
        return None
    depth, i = 1, starts[-1]
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped character, \{ or \} included, never opens or closes
            continue
        depth += (char == "{") - (char == "}")
        if depth == 0:
            return text[starts[-1] : i].strip()
        i += 1
    return None


def final_answer(text: str, fallback: str = "last_number") -> str | None:
    """The answer's text in a completion (see the module docstring); None when it gives none."""
    if _BOX.search(text):
        return last_box(text) or None  # the last box decides, even empty or unclosed
    marks = _GSM8K.findall(text)
    if marks:
        return marks[-1].strip() or None
    if fallback == "last_number":
        numbers = _NUMBER.findall(text)
        return numbers[-1].replace(",", "") if numbers else None
    return None


def _bounded(seconds: int, fn: Callable[[int | None], T], default: T) -> T:
    """``fn(timeout)`` within ``seconds``, or ``default`` when it times out or fails (a bad answer never
    crashes a round). In the main thread ``fn`` gets the timeout for math-verify's SIGALRM; elsewhere
    it gets None (math-verify would raise ValueError) and a profile hook of this thread raises
    TimeoutException past the deadline. The hook runs at every Python or C call, so only one long C
    call could overrun it; math-verify keeps powers and factorials unevaluated."""
    from math_verify.errors import TimeoutException  # a BaseException: `except Exception` misses it

    if threading.current_thread() is threading.main_thread():
        try:
            return fn(seconds)
        except (Exception, TimeoutException):
            return default
    deadline = time.monotonic() + seconds

    def hook(frame: Any, event: str, arg: Any) -> None:
        if time.monotonic() > deadline:
            raise TimeoutException("math grader: over its time limit")

    previous = sys.getprofile()
    sys.setprofile(hook)
    try:
        return fn(None)
    except (Exception, TimeoutException):
        return default
    finally:
        sys.setprofile(previous)


def _bits(expr: Any) -> float:
    """A bound on the bits of ``expr``'s exact value; inf past :data:`MAX_BITS`.

    Why: "9^{9^{9^{9}}}" or "(10^{10})!" would make sympy compute a number of billions of digits in
    one long C call or a call-free loop, which neither SIGALRM nor the thread's hook interrupts.
    An answer past the bound is no parse (its text still votes); so it is wrong, without a wait."""
    import sympy

    if not isinstance(expr, sympy.Basic):
        return 0.0  # math-verify's text fallback, or a matrix's own rows (checked as args)
    if expr.is_Rational:
        return float(int(expr.p).bit_length() + int(expr.q).bit_length())
    if not expr.args:
        return 64.0  # a float, a symbol, pi: evaluated to 15 digits at most
    growth = (sympy.factorial, sympy.factorial2, sympy.subfactorial, sympy.gamma)
    risky = expr.exp if expr.is_Pow else expr.args[0] if isinstance(expr, growth) else None
    if risky is not None and not risky.free_symbols:
        size = _magnitude(risky)
        base = _bits(expr.base) if expr.is_Pow else math.log2(max(size, 2.0))
        return base * max(size, 1.0) if base * max(size, 1.0) <= MAX_BITS else math.inf
    total = 1.0 + sum(_bits(arg) for arg in expr.args)
    return total if total <= MAX_BITS else math.inf


def _magnitude(expr: Any) -> float:
    """|value| of a numeric exponent or factorial argument; inf when it is itself too big to evaluate."""
    import sympy

    if _bits(expr) > 64:
        return math.inf
    value = abs(complex(sympy.N(expr, 15)))
    return value if math.isfinite(value) else math.inf


@lru_cache(maxsize=8192)
def _parse(content: str, timeout: int) -> tuple[Any, ...]:
    """math-verify's parse of one answer (sympy objects first, then its text); () when nothing parses.
    Cached: a round's extract_answer and reward read the same completion, and samples repeat."""
    from math_verify import LatexExtractionConfig, parse

    def run(seconds: int | None) -> tuple[Any, ...]:
        # the answer is already cut out of the completion: boxed, so math-verify reads it as LaTeX whole
        parsed = parse(f"\\boxed{{{content}}}", [LatexExtractionConfig()], parsing_timeout=seconds)
        return tuple(parsed) if parsed and _bits(parsed[0]) <= MAX_BITS else ()

    return _bounded(timeout, run, ())


def number_key(value: Fraction) -> str:
    """A number's key: exact for integers, else rounded to 6 decimal places (math-verify's
    ``float_rounding``, so 1/3 and 0.333333 are one key as verify finds them equal), zeros stripped."""
    if value.denominator == 1:
        return str(value.numerator)
    whole = len(str(abs(value.numerator) // value.denominator))
    with localcontext() as ctx:
        ctx.prec = whole + 12  # enough digits that the division is exact to the 6th decimal place
        dec = (Decimal(value.numerator) / Decimal(value.denominator)).quantize(_PLACES, ROUND_HALF_UP)
    text = format(dec, "f").rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _key(expr: Any, timeout: int) -> str | None:
    """The canonical key of a parsed answer; None when it cannot be computed in time."""
    import sympy

    def compute() -> str:
        target = expr
        if isinstance(target, sympy.Eq) and isinstance(target.lhs, sympy.Symbol):
            target = target.rhs  # "x = 3" answers 3, as math-verify's verify reads it
        if isinstance(target, sympy.Basic) and target.is_number:
            value = target if target.is_Number else sympy.N(target, 15)
            if value.is_Rational:
                return number_key(Fraction(int(value.p), int(value.q)))
            if value.is_Float and value.is_finite:
                if value != 0 and abs(sympy.log(abs(value), 10)) > _MAX_EXPONENT:
                    return str(sympy.Float(value, 6))  # Fraction would write out every digit
                return number_key(Fraction(str(value)))
        return str(target)

    def run(seconds: int | None) -> str:
        from math_verify.utils import timeout as alarm  # math-verify's SIGALRM decorator

        return alarm(seconds)(compute)() if seconds else compute()

    return _bounded(timeout, run, None)


class MathGrader:
    """Grades math answers with math-verify; ``timeout`` (whole seconds: SIGALRM's unit) bounds each
    parse, key and comparison. ``fallback``: what a completion with neither a box nor ``####`` answers
    ("last_number": its last number; "none": nothing). Needs the ``[math]`` extra."""

    def __init__(
        self, timeout: int = 5, fallback: str = "last_number", wanted_by: str = "task.grader=math"
    ) -> None:
        require("math_verify", "math", wanted_by)  # absent: one line naming the extra
        if fallback not in FALLBACKS:
            raise ValueError(f"math grader: fallback must be one of {FALLBACKS}, got {fallback!r}")
        if int(timeout) < 1:
            raise ValueError(f"math grader: timeout must be at least 1 second, got {timeout}")
        self.timeout = int(timeout)
        self.fallback = fallback
        for name in ("math_verify.parser", "math_verify.grader"):  # off the main thread we bound it ourselves
            logging.getLogger(name).addFilter(_no_timeout_notice)

    def _parsed(self, content: str | None) -> tuple[Any, ...]:
        return _parse(content, self.timeout) if content else ()

    def answer(self, completion: str) -> str | None:
        """The canonical key of the completion's final answer (what votes group by); None if none."""
        content = final_answer(completion, self.fallback)
        if content is None:
            return None
        parsed = self._parsed(content)
        key = _key(parsed[0], self.timeout) if parsed and not isinstance(parsed[0], str) else None
        return key if key is not None else "".join(content.split())

    def gold(self, target: str) -> tuple[Any, ...]:
        """A reference answer parsed; ValueError when it holds none (an empty or unclosed box, an
        empty ``####`` line, text math-verify cannot read at all)."""
        content = final_answer(target, "none") if _BOX.search(target) or "####" in target else target
        parsed = self._parsed(content.strip() if content else None)
        if not parsed:
            raise ValueError(f"no math answer in {target!r:.80}")
        return parsed

    def value(self, completion: str) -> float | None:
        """The final answer as a real number (partial credit); None if it is not one."""
        key = self.answer(completion)
        try:  # a number's key is a plain decimal, or scientific beyond 1e±300
            return float(key) if key is not None else None
        except ValueError:
            return None

    def reward(self, completion: str, target: str) -> float:
        """1.0 when math-verify finds the completion's final answer equal to ``target``, else 0.0."""
        from math_verify import verify

        parsed = self._parsed(final_answer(completion, self.fallback))
        if not parsed:
            return 0.0
        try:
            gold = self.gold(target)
        except ValueError:
            return 0.0
        same = _bounded(self.timeout, lambda s: verify(list(gold), list(parsed), timeout_seconds=s), False)
        return 1.0 if same else 0.0
