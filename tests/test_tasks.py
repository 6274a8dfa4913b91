"""Tests for selfimprove.tasks: parser, rewards, splits, determinism and file loading."""

from __future__ import annotations

import json
import random
import re
from fractions import Fraction
from pathlib import Path

import pytest

from selfimprove.tasks import ArithmeticTask, JsonlTask, Problem
from selfimprove.tasks.arithmetic import (
    evaluate_expression,
    random_tree,
    render_tree,
)
from selfimprove.tasks.base import Task, canonical_number, is_correct, numeric_reward

# "expression => exact value" pairs: precedence, associativity, unary minus, powers, division.
VALUE_CASES = """1 + 2 * 3 => 7 | (1 + 2) * 3 => 9 | 10 - 3 + 2 => 9 | 8 / 4 / 2 => 1 | -3 + 5 => 2
    | 2 * -3 => -6 | -(2 + 3) => -5 | --4 => 4 | -2^2 => -4 | 2^3^2 => 512 | 7^2 + 1 => 50
    | 1 / 3 => 1/3 | 5 / 2 => 5/2 | 2.5 * 2 => 5 |   42  => 42"""


@pytest.mark.parametrize(
    ("text", "value"), [case.split("=>") for case in VALUE_CASES.replace("\n", " ").split("|")]
)
def test_evaluate_expression(text: str, value: str) -> None:
    result = evaluate_expression(text)
    assert isinstance(result, Fraction)
    assert result == Fraction(value.strip())


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "1 +",
        "(1 + 2",
        "1 + 2)",
        "1 2",
        "abc",
        "__import__('os')",
        "__import__('os').system('true')",
        "1 / 0",
        "1 / (2 - 2)",
        "0^-1",
        "2^100000",
        "2^0.5",
        "1e5",
        "(" * 500 + "1" + ")" * 500,
        "-" * 500 + "1",
        "2^" * 500 + "2",
        "9^9^9",
    ],
)
def test_evaluate_expression_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        evaluate_expression(text)


def test_canonical_number() -> None:
    assert canonical_number(Fraction(65)) == "65"
    assert canonical_number(Fraction(-3)) == "-3"
    assert canonical_number(Fraction(5, 2)) == "2.5"
    assert canonical_number(Fraction(1, 3)) == "0.333333"
    assert canonical_number(Fraction(2, 3)) == "0.666667"
    assert canonical_number(Fraction(-1, 8)) == "-0.125"
    assert canonical_number(Fraction(1, 10**9)) == "0.000000001"
    assert canonical_number(Fraction(12345678, 7)) == "1763670"  # no exponent notation
    assert canonical_number("65.0") == "65"


def test_numeric_reward_paper_values() -> None:
    assert numeric_reward(10.5, 10) == pytest.approx(0.725, abs=1e-6)
    assert numeric_reward(10, 10) == 1.0
    assert numeric_reward(-3, 2) == 0.0
    assert 0.0 <= numeric_reward(1e300, -1e300) <= 1.0


def test_reward_and_is_correct() -> None:
    task = ArithmeticTask()
    problem = Problem(id="x", messages=[], prefill="57 + 8 = ", answer="65")
    assert task.reward("65<|im_end|>", problem) == 1.0
    assert is_correct(task, "65", problem) and task.is_correct("65", problem)
    assert task.reward("no idea", problem) == 0.0
    near = task.reward("64", problem)
    assert 0.0 < near < 1.0 and not is_correct(task, "64", problem)
    frac = Problem(id="y", messages=[], prefill="", answer="0.333333")
    assert task.reward("1/3", frac) == 1.0
    assert task.reward("0.3333333", frac) == 1.0
    assert not is_correct(task, "0.333", frac)


def test_add_2d_1d_prompt_prefill_answer() -> None:
    task = ArithmeticTask()
    for i in range(200):
        p = task.train_problem(i)
        expr = p.prefill.removesuffix(" = ")
        a, b = (int(x) for x in expr.split(" + "))
        assert 10 <= a <= 99 and 0 <= b <= 9
        assert p.messages == [{"role": "user", "content": f"What is {a} + {b}?"}]
        assert p.prefill == f"{a} + {b} = "
        assert p.answer == str(a + b)
        assert task.reward(f"{a + b}<|im_end|>", p) == 1.0
    no_prefill = ArithmeticTask(prefill=False, template="Compute {expr}.")
    p = no_prefill.train_problem(0)
    assert p.prefill == "" and p.messages[0]["content"].startswith("Compute ")


def test_determinism_and_seeds() -> None:
    a, b, c = ArithmeticTask(seed=1), ArithmeticTask(seed=1), ArithmeticTask(seed=2)
    assert [a.train_problem(i) for i in range(50)] == [b.train_problem(i) for i in range(50)]
    assert a.eval_problems(20) == b.eval_problems(20)
    assert [a.train_problem(i).prefill for i in range(50)] != [c.train_problem(i).prefill for i in range(50)]
    assert a.train_problem(10**12).answer  # any non-negative index works
    with pytest.raises(ValueError):
        a.train_problem(-1)


def test_train_eval_disjoint_and_eval_size() -> None:
    task = ArithmeticTask()
    evals = task.eval_problems(300)
    eval_exprs = {p.prefill for p in evals}
    assert len(eval_exprs) == 300
    assert len({p.id for p in evals}) == 300
    train_exprs = {task.train_problem(i).prefill for i in range(5000)}
    assert not train_exprs & eval_exprs
    assert len(train_exprs) + 300 <= 900
    assert task.eval_problems(10) == evals[:10]  # "first n" is a prefix
    with pytest.raises(ValueError, match="held-out"):
        task.eval_problems(10000)


@pytest.mark.parametrize("level", ["add_1d", "mul_1d", "depth1", "depth3"])
def test_other_levels_disjoint(level: str) -> None:
    task = ArithmeticTask(level=level)
    evals = {p.prefill for p in task.eval_problems(20)}
    assert len(evals) == 20
    assert not evals & {task.train_problem(i).prefill for i in range(500)}


def test_simple_level_answers() -> None:
    p = ArithmeticTask(level="mul_1d").train_problem(3)
    a, b = (int(x) for x in p.prefill.removesuffix(" = ").split(" * "))
    assert p.answer == str(a * b)
    p = ArithmeticTask(level="add_1d").train_problem(3)
    a, b = (int(x) for x in p.prefill.removesuffix(" = ").split(" + "))
    assert a < 10 and b < 10 and p.answer == str(a + b)


@pytest.mark.parametrize("level", ["bogus", "depth0", "depth21"])
def test_bad_level(level: str) -> None:
    with pytest.raises(ValueError, match="level"):
        ArithmeticTask(level=level)


def test_bad_config() -> None:
    with pytest.raises(ValueError):
        ArithmeticTask(heldout_fraction=1.0)
    with pytest.raises(ValueError):
        ArithmeticTask(template="no placeholder")


@pytest.mark.parametrize("level", ["depth1", "depth2", "depth5", "depth20"])
def test_depth_answers_come_from_rendered_string(level: str) -> None:
    task = ArithmeticTask(level=level)
    for i in range(30):
        p = task.train_problem(i)
        expr = p.prefill.removesuffix(" = ")
        assert p.messages[0]["content"] == f"What is {expr}?"
        assert p.answer == canonical_number(evaluate_expression(expr))


def _tree_value(node: object) -> Fraction:
    if isinstance(node, int):
        return Fraction(node)
    op, left, right = node  # type: ignore[misc]
    lv, rv = _tree_value(left), _tree_value(right)
    if op == "+":
        return lv + rv
    if op == "-":
        return lv - rv
    if op == "*":
        return lv * rv
    if op == "/":
        return lv / rv  # ZeroDivisionError is skipped by the caller
    return lv ** int(rv)


def test_minus_trap() -> None:
    tree = ("-", 10, ("+", 3, 2))
    assert render_tree(tree) == "10 - 3 + 2"
    assert _tree_value(tree) == 5
    assert evaluate_expression(render_tree(tree)) == 9
    assert render_tree(("*", ("+", 1, 2), ("/", 3, 4))) == "(1 + 2) * (3 / 4)"
    assert render_tree(("/", ("^", 7, 2), 5)) == "7^2 / 5"
    # The generator really produces trees whose rendered value differs from the tree's.
    rng = random.Random(0)
    mismatches = 0
    for _ in range(300):
        tree = random_tree(rng, 3)
        try:
            if _tree_value(tree) != evaluate_expression(render_tree(tree)):
                mismatches += 1
        except (ValueError, TypeError, ZeroDivisionError):
            continue
    assert mismatches > 0


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("65<|im_end|>", "65"),
        (" 65", "65"),
        ("The answer is 65.", "65"),
        ("", None),
        ("abc", None),
        ("-3", "-3"),
        ("2.50", "2.5"),
        ("3/4", "0.75"),
        ("2.83/1", "2.83"),  # a decimal over a denominator: once a crash that ended a depth1 run
        ("1.5/3", "0.5"),
        ("7/0", "7"),
    ],
)
def test_extract_answer(completion: str, expected: str | None) -> None:
    assert ArithmeticTask().extract_answer(completion) == expected


def test_extract_answer_without_prefill() -> None:
    task = ArithmeticTask(prefill=False)
    assert task.extract_answer("57 + 8 = 65") == "65"
    assert task.extract_answer("57 + 8 = 50 + 15 = 65.") == "65"
    assert task.extract_answer("It is 65") == "65"
    assert task.extract_answer("57 + 8 = ?") is None


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")


ROWS = [{"question": f"What is {i} + {i}?", "answer": str(2 * i), "pre": "A: "} for i in range(50)]


def test_jsonl_good_file(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    _write_jsonl(path, ROWS)
    task = JsonlTask(str(path), system="Be brief.", prefill_field="pre", seed=3)
    assert isinstance(task, Task)
    assert task.num_train + task.num_heldout == 50 and task.num_heldout > 0
    evals = task.eval_problems(task.num_heldout)
    eval_prompts = {p.messages[-1]["content"] for p in evals}
    train = [task.train_problem(i) for i in range(3 * task.num_train)]
    assert not eval_prompts & {p.messages[-1]["content"] for p in train}
    # Each pass covers every training row exactly once.
    first_pass = {p.messages[-1]["content"] for p in train[: task.num_train]}
    assert len(first_pass) == task.num_train
    assert train == [task.train_problem(i) for i in range(3 * task.num_train)]
    p = evals[0]
    assert p.messages[0] == {"role": "system", "content": "Be brief."}
    assert p.prefill == "A: "
    assert task.reward(f"{p.answer} done", p) == 1.0
    assert task.reward("wrong", p) == 0.0
    assert task.reward(f"{p.answer}.0", p) == 1.0
    with pytest.raises(ValueError, match="held-out"):
        task.eval_problems(task.num_heldout + 1)


def test_jsonl_answer_match_last(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    _write_jsonl(path, ROWS)
    task = JsonlTask(str(path), answer_match="last", answer_pattern=r"#### (-?\d+)")
    p = task.train_problem(0)
    assert task.extract_answer(f"#### 1\n2 + 2 ... #### {p.answer}") == p.answer


def test_jsonl_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n\n{not json}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        JsonlTask(str(path))


def test_jsonl_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "missing.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n{"question": "r"}\n')
    with pytest.raises(ValueError, match=r"missing\.jsonl:2: missing field 'answer'"):
        JsonlTask(str(path))


def test_jsonl_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        JsonlTask(str(path))


def test_parquet_round_trip(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl, parquet = tmp_path / "qa.jsonl", tmp_path / "qa.parquet"
    _write_jsonl(jsonl, ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    a, b = JsonlTask(str(jsonl)), JsonlTask(str(parquet))
    assert a.eval_problems(a.num_heldout) == b.eval_problems(b.num_heldout)
    assert [a.train_problem(i) for i in range(60)] == [b.train_problem(i) for i in range(60)]
    pq.write_table(pa.Table.from_pylist([{"question": "q"}]), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet:row 0: missing field 'answer'"):
        JsonlTask(str(tmp_path / "bad.parquet"))


def test_jsonl_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nope\.jsonl: no such file"):
        JsonlTask(str(tmp_path / "nope.jsonl"))


def test_jsonl_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "q", "answer": "1"}\n{"question": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8"):
        JsonlTask(str(path))


def test_jsonl_byte_order_mark_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"question": "q", "answer": "1"}\n')
    assert JsonlTask(str(path), heldout_fraction=0.0).train_problem(0).answer == "1"


def test_parquet_empty_and_unreadable(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    no_rows = tmp_path / "no_rows.parquet"
    pq.write_table(
        pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), no_rows
    )
    with pytest.raises(ValueError, match=r"no_rows\.parquet: no rows"):
        JsonlTask(str(no_rows))
    zero_bytes = tmp_path / "zero.parquet"
    zero_bytes.write_bytes(b"")
    with pytest.raises(ValueError, match=r"zero\.parquet: not a readable Parquet file"):
        JsonlTask(str(zero_bytes))


def test_eval_count_error_says_how_many_exist(tmp_path: Path) -> None:
    # The caller prefixes the config key: "eval.n_problems: asked for 10000 held-out problems but ..."
    task = ArithmeticTask()
    with pytest.raises(ValueError, match=r"^asked for 10000 held-out problems but .* has only (\d+);") as err:
        task.eval_problems(10000)
    available = int(re.search(r"has only (\d+)", str(err.value)).group(1))
    assert len(task.eval_problems(available)) == available  # the number it gives is the real one
    with pytest.raises(ValueError, match=rf"has only {available}; ask for at most {available}$"):
        task.eval_problems(available + 1)
    with pytest.raises(ValueError, match=r"^asked for -1 held-out problems"):
        task.eval_problems(-1)
    path = tmp_path / "qa.jsonl"
    _write_jsonl(path, ROWS)
    jsonl = JsonlTask(str(path))
    n = jsonl.num_heldout
    with pytest.raises(
        ValueError, match=rf"^asked for {n + 1} held-out problems but .*qa\.jsonl .* has only {n};"
    ):
        jsonl.eval_problems(n + 1)
