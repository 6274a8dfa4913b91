"""The math grader (math-verify): extraction, equivalence on hand-written pairs, canonical keys that votes
group by, bad and adversarial answers, and task.grader=math on small GSM8K- and MATH-style files."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("math_verify", reason="the [math] extra is not installed")

from selfimprove.metrics import majority_answer  # noqa: E402
from selfimprove.tasks import HFDatasetTask, JsonlTask  # noqa: E402
from selfimprove.tasks.math_grader import MathGrader, final_answer, last_box  # noqa: E402
from selfimprove.verify.rewards import MajorityVoteReward  # noqa: E402

DATA = Path(__file__).parent / "data"
GRADER = MathGrader(timeout=1)

# (reference answer, completion, equal?) — hand-written, with the verdict math-verify should give.
PAIRS = [
    # fractions and decimals
    ("1/2", r"So the answer is \boxed{\frac{1}{2}}.", True),
    ("1/2", r"\boxed{0.5}", True),
    ("1/2", r"\boxed{\dfrac12}", True),
    ("1/2", r"\boxed{1/2}", True),
    ("0.5", r"\boxed{\tfrac{1}{2}}", True),
    ("1/3", r"\boxed{0.333333}", True),
    ("1/3", r"\boxed{0.33}", False),
    (r"\frac{3}{4}", r"\boxed{\frac{6}{8}}", True),
    ("0.875", r"\boxed{\frac{7}{8}}", True),
    ("-3/4", r"\boxed{-\frac{3}{4}}", True),
    ("-3/4", r"\boxed{\frac{3}{4}}", False),
    ("72", r"\boxed{72.0}", True),
    ("72", r"\boxed{71}", False),
    # LaTeX forms
    (r"2\sqrt{2}", r"\boxed{\sqrt{8}}", True),
    (r"\frac{\sqrt{2}}{2}", r"\boxed{\frac{1}{\sqrt{2}}}", True),
    (r"\pi", r"\boxed{\pi}", True),
    (r"\pi", r"\boxed{3}", False),
    ("8", r"\boxed{2^{3}}", True),
    ("x+1", r"\boxed{1 + x}", True),
    ("3", r"\boxed{x = 3}", True),
    # intervals and sets
    (r"(2, \infty)", r"\boxed{(2,\infty)}", True),
    (r"[1, 2)", r"\boxed{[1,2)}", True),
    (r"[1, 2)", r"\boxed{[1,2]}", False),
    (r"\{1, 2, 3\}", r"\boxed{3, 2, 1}", True),
    # units and text around the box
    ("5", r"The length is \boxed{5\text{ cm}} in all.", True),
    ("5", r"It costs \boxed{\$5}.", True),
    ("90", r"The angle is \boxed{90^\circ}.", True),
    ("1000", r"\boxed{1,000}", True),
    # nested braces, fbox, several boxes
    (r"\frac{1}{12}", r"\boxed{\frac{1}{\frac{12}{1}}}", True),
    ("7", r"\fbox{7}", True),
    ("3", r"First \boxed{2}, then corrected: \boxed{3}", True),
    ("2", r"First \boxed{2}, then corrected: \boxed{3}", False),
    # no box: GSM8K's "#### n", then the last number
    ("42", "12 + 30 = 42\n#### 42", True),
    ("42", "12 + 30 = 42 apples", True),
    ("42", "I do not know.", False),
    # bad answers are a defined "wrong"
    ("3", r"\boxed{}", False),
    ("3", r"so it is \boxed{3", False),
    ("3", r"\boxed{3} and then \boxed{", False),
]


@pytest.mark.parametrize(("gold", "completion", "equal"), PAIRS)
def test_pairs(gold: str, completion: str, equal: bool) -> None:
    assert GRADER.reward(completion, gold) == float(equal)


def test_pair_count() -> None:
    assert len(PAIRS) >= 30


def test_extraction_rules() -> None:
    assert last_box(r"\boxed{\frac{1}{2}} then \boxed{\left\{ 1 \right\}}") == r"\left\{ 1 \right\}"
    assert last_box(r"\boxed{a\}b}") == r"a\}b"  # an escaped brace does not close the box
    assert last_box(r"\boxed{  }") == "" and last_box(r"\boxed{1") is None and last_box("none") is None
    assert final_answer(r"\boxed{2} \boxed{}") is None  # the last box decides, even empty
    assert final_answer(r"\boxed{2} \boxed{3") is None  # ... or unclosed (a cut-off completion)
    assert final_answer("work\n#### 1,234\n") == "1,234"
    assert final_answer("so 3 then 4/5 left") == "4/5"
    assert final_answer("so 3 then 4/5 left", fallback="none") is None
    assert final_answer("#### \n") is None
    with pytest.raises(ValueError, match="fallback"):
        MathGrader(fallback="first")


def test_one_key_per_value() -> None:
    """Equal answers written differently are one key, so every vote groups them."""
    same = [
        r"\boxed{1/2}",
        r"\boxed{0.5}",
        r"\boxed{\frac{1}{2}}",
        r"\boxed{\dfrac12}",
        "#### 0.50",
        "it is 1/2",
    ]
    assert {GRADER.answer(c) for c in same} == {"0.5"}
    assert GRADER.answer(r"\boxed{\frac{1}{3}}") == GRADER.answer(r"\boxed{0.333333}") == "0.333333"
    assert GRADER.answer(r"\boxed{\sqrt{8}}") == GRADER.answer(r"\boxed{2\sqrt{2}}")
    assert GRADER.answer(r"\boxed{x = 3}") == GRADER.answer(r"\boxed{3}") == "3"
    assert GRADER.answer(r"\boxed{1234567.8}") == "1234567.8"  # no rounding to significant digits
    assert GRADER.answer(r"\boxed{50\%}") == r"50\%"  # math-verify cannot read it: its text votes
    assert GRADER.answer(r"\boxed{}") is None and GRADER.answer(r"\boxed{3") is None
    # a vote over the keys (majority vote, TTRL, EMPO, maj@k and Borda all group by the answer column)
    answers = [
        GRADER.answer(c) for c in [r"\boxed{0.5}", r"\boxed{2}", r"\boxed{\frac12}", r"\boxed{2.0}", "1/2"]
    ]
    assert majority_answer(answers) == "0.5"
    rows = [{"prompt_id": "p", "answer": a} for a in answers]
    assert MajorityVoteReward().score(rows) == [1.0, 0.0, 1.0, 0.0, 1.0]


ADVERSARIAL = [
    r"\boxed{9^{9^{9^{9}}}}",
    r"\boxed{9^9^9^9}",
    r"\boxed{10^{10^{10}}}",
    r"\boxed{7^{123456789}}",
    r"\boxed{(10^{10})!}",
    r"\boxed{100!!!}",
    r"\boxed{10^{-100000000}}",
    "\\boxed{" + "{" * 400 + "1" + "}" * 400 + "}",
    r"\boxed{" + "(" * 300 + "1" + ")" * 300 + "}",
    r"\boxed{\frac{1}{0}}",
    r"\boxed{\left( \right) \sqrt[}",
]


def _grade_all(grader: MathGrader) -> list[tuple[float, float]]:
    out = []
    for completion in ADVERSARIAL:
        start = time.monotonic()
        grader.answer(completion)
        verdict = grader.reward(completion, "3")
        out.append((verdict, time.monotonic() - start))
    return out


def test_adversarial_answers_are_wrong_in_time() -> None:
    """Each is "wrong" within the grader's limits (a parse, a key and a comparison of 1 s each)."""
    for verdict, seconds in _grade_all(MathGrader(timeout=1)):
        assert verdict == 0.0 and seconds < 3.5


def test_adversarial_answers_off_the_main_thread() -> None:
    """math-verify's SIGALRM timeout raises ValueError off the main thread; the grader bounds it there too."""
    results: list = []
    worker = threading.Thread(target=lambda: results.append(_grade_all(MathGrader(timeout=1))))
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive() and len(results) == 1
    for verdict, seconds in results[0]:
        assert verdict == 0.0 and seconds < 3.5
    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(GRADER.reward(r"\boxed{\frac{2}{4}}", "0.5")))
    worker.start()
    worker.join(timeout=30)
    assert outcome == [1.0]  # and a good answer is still right there


def test_jsonl_gsm8k_rows(tmp_path: Path) -> None:
    """A row whose answer holds no math answer is skipped at load, named with its line, and counted."""
    task = JsonlTask(str(DATA / "gsm8k_style.jsonl"), grader="math", heldout_fraction=0.3)
    assert task.num_train + task.num_heldout == 6
    assert len(task.skipped) == 1 and task.skipped[0].startswith(f"{DATA / 'gsm8k_style.jsonl'}:7:")
    problems = [task.train_problem(i) for i in range(task.num_train)] + task.eval_problems(task.num_heldout)
    quarter = next(p for p in problems if "pizza" in p.messages[-1]["content"])
    assert task.reward(r"Each gets \boxed{\frac{1}{4}}.", quarter) == 1.0
    assert task.reward("each gets 1/4", quarter) == 1.0
    assert task.reward(r"\boxed{\frac{1}{2}}", quarter) == 0.0
    assert task.extract_answer(r"\boxed{\frac{1}{4}}") == task.extract_answer("#### 0.25") == "0.25"
    tank = next(p for p in problems if "tank" in p.messages[-1]["content"])
    assert task.reward("so 300 liters\n#### 300", tank) == 1.0
    # the default grader is unchanged: the first number
    assert JsonlTask(str(DATA / "gsm8k_style.jsonl")).extract_answer("12 then 42") == "12"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "\\\\boxed{}"}\n')
    with pytest.raises(ValueError, match=r"no row has an answer the math grader can read \(.*bad.jsonl:1:"):
        JsonlTask(str(bad), grader="math")
    with pytest.raises(ValueError, match="grader must be one of"):
        JsonlTask(str(DATA / "gsm8k_style.jsonl"), grader="sympy")


def test_hf_dataset_math_rows(tmp_path: Path) -> None:
    task = HFDatasetTask(
        str(DATA / "math_style.jsonl"),
        prompt_field="problem",
        answer_field="solution",
        grader="math",
        heldout_fraction=0.3,
        cache_dir=str(tmp_path / "cache"),
    )
    assert task.num_train + task.num_heldout == 6
    assert sorted(s.split(":train row ")[1][:1] for s in task.skipped) == ["6", "7"]  # unclosed, empty
    problems = [task.train_problem(i) for i in range(task.num_train)] + task.eval_problems(task.num_heldout)

    def problem(word: str):
        return next(p for p in problems if word in p.messages[-1]["content"])

    assert task.reward(r"\boxed{0.5}", problem("3}{4}")) == 1.0
    assert task.reward(r"so $x \in \boxed{(2, \infty)}$", problem("interval")) == 1.0
    assert task.reward(r"\boxed{[2, \infty)}", problem("interval")) == 0.0
    assert task.reward(r"\boxed{\sqrt{8}}", problem("Simplify")) == 1.0
    assert task.reward(r"\boxed{\frac{7}{8}}", problem("decimal")) == 1.0
    assert task.reward(r"\boxed{8.0}", problem("^{-3}")) == 1.0


def test_config_selects_the_grader() -> None:
    from hydra.utils import instantiate

    from tests.conftest import cfg_of

    path = DATA / "gsm8k_style.jsonl"
    task = instantiate(cfg_of("task=jsonl", f"task.path={path}", "task.grader=math").task)
    assert task.math is not None and task.extract_answer(r"\boxed{\dfrac12}") == "0.5"
    assert instantiate(cfg_of("task=jsonl", f"task.path={path}").task).math is None  # default: regex


def test_without_the_extra_one_line() -> None:
    """Without math-verify (hidden from this interpreter's imports), one line names the extra."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['math_verify'] = None\n"
        "from selfimprove.tasks import JsonlTask, RandomCalculationTask\n"
        f"for make in (RandomCalculationTask, lambda: JsonlTask({str(DATA / 'gsm8k_style.jsonl')!r}, grader='math')):\n"
        "    try: make()\n"
        "    except ValueError as e: print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=DATA.parent.parent
    )
    assert out.returncode == 0 and out.stdout.splitlines() == [
        "task=random_calculation needs math_verify: pip install 'selfimprove[math]'",
        "task.grader=math needs math_verify: pip install 'selfimprove[math]'",
    ]
