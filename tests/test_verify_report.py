"""`selfimprove verify-report`: the metrics behind it on hand-computed examples, its numbers on made-up
rows, and the command end to end on the tiny model (json, md, plots, samples, one-line mistakes)."""

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from selfimprove.compose import CONFIG_DIR
from selfimprove.metrics import (
    auroc,
    auroc_within,
    best_of_k,
    ece,
    majority_of_k,
    rank_order,
    reliability_bins,
)
from selfimprove.sample import main as sample_main
from selfimprove.verify_report import ks_of, main, summarize

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")  # each test's engines start afresh

VERIFIERS = Path(CONFIG_DIR) / "verifier"
HAS_PTRUE = (VERIFIERS / "ptrue.yaml").exists()
FIELDS = {
    "name",
    "column",
    "probability",
    "uses_labels",
    "auroc_pooled",
    "auroc_within",
    "prompts_with_both",
    "best_of_n",
    "best_of_k",
    "ece",
    "reliability",
    "non_finite_scores",
    "note",
    "seconds",
    "s_per_1000",
}


# --- metrics ----------------------------------------------------------------------------------------


def test_auroc_within_differs_from_pooled():
    # easy prompt: all correct, all high; hard prompt: all low, one correct (0.2, beaten by a wrong 0.3);
    # a tie prompt: one correct and one wrong with the same score.
    scores = [0.9, 0.8, 0.95, 0.1, 0.3, 0.2, 0.05, 0.5, 0.5]
    labels = [True, True, True, False, False, True, False, True, False]
    groups = ["easy"] * 3 + ["hard"] * 4 + ["tie"] * 2
    # pooled: 5 positives x 4 negatives; the easy ones beat all 4 (12), 0.2 beats 0.1 and 0.05 (2),
    # 0.5 beats 0.1, 0.3, 0.05 and ties 0.5 (3.5): 17.5 / 20
    assert auroc(scores, labels) == pytest.approx(17.5 / 20)
    # within: hard gives U = 2 of 3 pairs, tie U = 1/2 of 1; easy has no wrong sample
    assert auroc_within(scores, labels, groups) == (pytest.approx(2.5 / 4), 2)
    assert auroc_within(scores[:7], labels[:7], groups[:7]) == (pytest.approx(2 / 3), 1)


def test_auroc_within_edges():
    assert auroc_within([0.1, 0.2], [True, True], ["a", "a"]) == (None, 0)  # no prompt has both
    assert auroc_within([], [], []) == (None, 0)
    # nan scores are dropped (as auroc does): the prompt left with one class does not count
    assert auroc_within([math.nan, 0.2, 0.4, 0.1], [True, False, True, False], "aabb") == (1.0, 1)
    # -inf (an empty completion) is a score like any other: the lowest
    assert auroc_within([-math.inf, 0.0], [False, True], "aa") == (1.0, 1)


def _brute_best_of_k(scores, correct, k):
    """The mean over every k-subset of the correctness of its top score (ties to the lower index)."""
    key = [-math.inf if math.isnan(s) else s for s in scores]
    picks = [max(sub, key=lambda i: (key[i], -i)) for sub in itertools.combinations(range(len(scores)), k)]
    return sum(bool(correct[i]) for i in picks) / len(picks)


def test_best_of_k_by_hand():
    # ranks: 0 (wrong), 1, 2 (right); for k = 2 only the subset {1, 2} picks a right one: 1/3
    assert best_of_k([3.0, 2.0, 1.0], [False, True, True], 2) == pytest.approx(1 / 3)
    assert best_of_k([3.0, 2.0, 1.0], [False, True, True], 1) == pytest.approx(2 / 3)
    assert best_of_k([3.0, 2.0, 1.0], [False, True, True], 3) == 0.0
    assert rank_order([0.3, 0.9, 0.3, math.nan, 0.9]) == [1, 4, 0, 2, 3]
    with pytest.raises(ValueError):
        best_of_k([1.0], [True], 2)


@pytest.mark.parametrize(
    "scores, correct",
    [
        ([0.3, 0.9, 0.3, 0.1, 0.9, math.nan], [True, False, False, True, True, False]),  # ties and a nan
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], [True, False, True, False, False, True, False]),
        ([0.5] * 5, [False, False, True, True, False]),  # all tied: the lowest index in the subset
        ([-math.inf, -1.0, -math.inf, 2.0], [True, True, False, False]),
    ],
)
def test_best_of_k_equals_enumeration(scores, correct):
    n = len(scores)
    for k in range(1, n + 1):
        assert best_of_k(scores, correct, k) == pytest.approx(_brute_best_of_k(scores, correct, k), abs=1e-12)
    assert best_of_k(scores, correct, 1) == pytest.approx(sum(correct) / n)  # k = 1: a random sample
    assert best_of_k(scores, correct, n) == float(correct[rank_order(scores)[0]])  # k = N: the argmax


def _brute_majority_of_k(pairs, k):
    """maj@k over every k-subset by counting: the most common answer (None never), ties to the first."""
    hits = []
    for sub in itertools.combinations(pairs, k):
        counts = {}
        for answer, _ in sub:
            if answer is not None:
                counts[answer] = counts.get(answer, 0) + 1
        top = max(counts.values(), default=0)
        winner = next((a for a, _ in sub if a is not None and counts[a] == top), None)
        hits.append(winner is not None and next(c for a, c in sub if a == winner))
    return sum(hits) / len(hits)


def test_majority_of_k():
    pairs = [("7", True), ("5", False), ("7", True), (None, False), ("5", False)]
    # k = 5, one subset: "7" and "5" tie at 2 votes and "7" is seen first -> right
    assert majority_of_k(pairs, 5) == 1.0
    assert majority_of_k(pairs[1:] + pairs[:1], 5) == 0.0  # "5" seen first now wins the same tie
    assert majority_of_k(pairs, 1) == pytest.approx(2 / 5)  # a single vote: that sample
    # k = 2 by hand: the 10 pairs, ties to the first seen; "7" wins {0,1},{0,2},{0,3},{0,4},{2,3},{2,4}
    # and {1,2} loses to the first-seen "5"
    assert majority_of_k(pairs, 2) == pytest.approx(6 / 10)
    # 12 samples, k = 6: C(12, 6) = 924 subsets. With draws >= 924 every one is counted (exact);
    # with 923 draws they are sampled, seeded: the same number twice, close to the exact one.
    many = [(str(i % 3), i % 3 == 0) for i in range(12)]
    exact = _brute_majority_of_k(many, 6)
    assert 0.2 < exact < 0.5  # ties between answers are common: the tie rule matters here
    assert majority_of_k(many, 6, draws=924) == pytest.approx(exact, abs=1e-12)
    drawn = majority_of_k(many, 6, draws=923, seed=1)
    assert drawn == majority_of_k(many, 6, draws=923, seed=1) and drawn != exact
    assert drawn == pytest.approx(exact, abs=0.06)  # 923 draws: standard error about 0.016


def test_reliability_bins_by_hand():
    probs = [0.05, 0.15, 0.12, 0.95, 1.0, 0.5]
    labels = [False, True, False, True, True, False]
    bins = reliability_bins(probs, labels, bins=4)
    assert [b["count"] for b in bins] == [3, 0, 1, 2]
    assert (bins[0]["lo"], bins[0]["hi"]) == (0.0, 0.25)
    assert bins[0]["confidence"] == pytest.approx(0.32 / 3) and bins[0]["accuracy"] == pytest.approx(1 / 3)
    assert bins[1]["confidence"] is None and bins[1]["accuracy"] is None
    assert bins[2]["accuracy"] == 0.0 and bins[3]["confidence"] == pytest.approx(0.975)
    # ece is the count-weighted gap of these bins
    gap = sum(b["count"] / 6 * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    assert ece(probs, labels, bins=4) == pytest.approx(gap)


def test_ks_of():
    assert ks_of(1) == [1] and ks_of(4) == [1, 2, 4] and ks_of(6) == [1, 2, 4, 6] and ks_of(8) == [1, 2, 4, 8]


# --- the report's numbers on made-up rows -----------------------------------------------------------


def test_summarize_made_up_rows():
    def scorer(name, probability=False):
        return SimpleNamespace(name=name, column=f"score/{name}", reads=(), probability=probability)

    # prompt a: answers 7 7 3 (7 right); prompt b: 1 2 2 (1 right); p: a probability, s: a score
    table = [
        ("a", 0, "7", True, 0.9, 0.1),
        ("a", 1, "7", True, 0.8, 0.5),
        ("a", 2, "3", False, 0.2, 0.9),
        ("b", 0, "1", True, 0.6, 0.3),
        ("b", 1, "2", False, 0.7, 0.2),
        ("b", 2, "2", False, 0.1, 0.1),
    ]
    rows = [
        dict(prompt_id=p, sample_idx=i, answer=a, correct=c, **{"score/p": x, "score/s": y})
        for p, i, a, c, x, y in table
    ]
    named = [("p", scorer("p", probability=True)), ("ptrue_like", scorer("s"))]
    rep = summarize(rows[::-1], named, {"p": 0.6, "ptrue_like": 0.0}, sampling_seconds=1.2)
    ref = rep["reference"]
    assert (rep["n_prompts"], rep["n"], rep["n_samples"]) == (2, 3, 6)
    assert ref["random"] == pytest.approx(0.5) and ref["majority"] == 0.5 and ref["pass_at_n"] == 1.0
    assert ref["prompts_with_both"] == 2 and ref["sampling_s_per_1000"] == pytest.approx(200.0)
    assert rep["curves"]["k"] == [1, 2, 3] and rep["curves"]["pass"][-1] == 1.0
    assert rep["curves"]["majority"][-1] == 0.5 and rep["curves"]["random"] == [0.5] * 3
    p, s = rep["scorers"]
    assert set(p) == FIELDS
    # p picks 0.9 (right) in a and 0.7 (wrong) in b; within: a 2/2 pairs, b 1/2 (0.6 > 0.1) -> 3/4
    assert p["best_of_n"] == 0.5 and p["auroc_within"] == 0.75 and p["prompts_with_both"] == 2
    assert p["probability"] and p["ece"] is not None and len(p["reliability"]) == 10
    assert p["s_per_1000"] == pytest.approx(100.0)
    # ptrue_like is read as a probability by its config name; s picks 0.9 (wrong) in a, 0.3 (right) in b
    assert s["probability"] and s["best_of_n"] == 0.5 and s["auroc_within"] == pytest.approx((0 + 2) / 4)
    assert s["best_of_k"][0] == pytest.approx(0.5)


# --- the command ------------------------------------------------------------------------------------

ARGS = ["model=tiny", "prompts=4", "sampler.n=4", "sampler.max_new_tokens=4"]


def _in_range(value, lo=0.0, hi=1.0):
    return value is None or lo <= value <= hi


def test_report_end_to_end(tmp_path):
    names = ["self_certainty", "loglik_base_mean", "majority", *(["ptrue"] if HAS_PTRUE else [])]
    out = tmp_path / "report"
    main([*ARGS, f"verifiers={','.join(names)}", f"out={out}"])
    report = json.loads((out / "verify_report.json").read_text())
    md = (out / "verify_report.md").read_text()
    assert (out / "best_of_n.png").stat().st_size > 0
    assert [s["name"] for s in report["scorers"]] == names  # none reads another: the order given
    assert (report["n_prompts"], report["n"], report["n_samples"]) == (4, 4, 16)
    assert report["curves"]["k"] == [1, 2, 4] and report["skipped"] == {}
    ref = report["reference"]
    for key in ("random", "majority", "pass_at_n"):
        assert _in_range(ref[key]), key
    assert ref["sampling_s_per_1000"] > 0 and 0 <= ref["prompts_with_both"] <= 4
    for s in report["scorers"]:
        assert set(s) == FIELDS, s["name"]
        assert s["column"] == f"score/{s['name']}"
        for key in ("auroc_pooled", "auroc_within", "best_of_n", "ece"):
            assert _in_range(s[key]), (s["name"], key)
        assert all(_in_range(v) for v in s["best_of_k"]) and len(s["best_of_k"]) == 3
        assert s["s_per_1000"] >= 0 and 0 <= s["prompts_with_both"] <= 4
        assert s["probability"] == (s["name"] == "ptrue")
        assert (s["ece"] is not None) == (s["name"] == "ptrue")
        assert f"| {s['name']} |" in md
    assert "ARGS" not in md and "selfimprove verify-report model=tiny" in md
    for words in ("random sample", "majority vote", "pass@4", "sampling", "ArithmeticTask", "tiny"):
        assert words in md, words
    # the scored rows, one a sample, with every scorer's column
    rows = pq.read_table(out / "samples.parquet").to_pylist()
    assert len(rows) == 16 and all(s["column"] in rows[0] for s in report["scorers"])
    # the same samples as `selfimprove sample` with the same arguments: its code and seeds
    sample_main([*ARGS, f"out={tmp_path / 's.parquet'}"])
    same = pq.read_table(tmp_path / "s.parquet").to_pylist()
    assert [r["completion_ids"] for r in same] == [r["completion_ids"] for r in rows]

    if HAS_PTRUE:
        assert (out / "reliability.png").stat().st_size > 0 and "reliability.png" in md
        assert len(report["scorers"][-1]["reliability"]) == 10
        # without a probability-valued scorer: no diagram (not even the last report's), and the md says so
        main(["model=tiny", "prompts=2", "sampler.n=2", "verifiers=self_certainty", f"out={out}"])
    else:
        pytest.skip("configs/verifier/ptrue.yaml is not there: the P(True) part is skipped")
    assert not (out / "reliability.png").exists()
    assert (
        "No reliability diagram and no ECE: no probability-valued scorer was run"
        in (out / "verify_report.md").read_text()
    )
    assert json.loads((out / "verify_report.json").read_text())["files"]["reliability"] is None


def test_default_verifiers(tmp_path, monkeypatch):
    """By default every config but the label and those with an unset ??? value; a named one must be
    complete."""
    from selfimprove.verify_report import available, verifier_configs

    names = available()
    cfg, skipped = verifier_configs(None, [])
    assert "ground_truth" not in cfg.verifiers and "ground_truth" in skipped
    assert set(cfg.verifiers) | set(skipped) == set(names)
    if "reward_model" in names:  # path: ??? -> left out by default, its missing key named when asked for
        assert skipped["reward_model"] == "needs verifiers.reward_model.path=..."
        cfg, skipped = verifier_configs(None, ["verifiers.reward_model.path=/models/rm"])
        assert cfg.verifiers.reward_model.path == "/models/rm"
    cfg, _ = verifier_configs("self_certainty,majority,self_certainty", [])
    assert list(cfg.verifiers) == ["self_certainty", "majority"]


def test_mistakes_are_one_line(tmp_path, capsys):
    def error(*args):
        with pytest.raises(SystemExit) as exit_:
            main(list(args))
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("verify-report: "), err
        return exit_.value.code, err

    out = f"out={tmp_path / 'r'}"
    code, err = error("model=tiny", "verifiers=nope", out)
    assert code == 2 and "verifiers: no verifier config named 'nope' (available: " in err
    assert "self_certainty" in err and "majority" in err
    assert error("model=tiny", "verifiers=")[1].startswith("verify-report: out: missing value")
    assert "verifiers: name at least one" in error("model=tiny", "verifiers=,", out)[1]
    assert "prompts" in error("model=tiny", "prompts=0", out)[1]
    assert "verifiers.self_certainty.nope" in error("model=tiny", "verifiers.self_certainty.nope=1", out)[1]
    if (VERIFIERS / "reward_model.yaml").exists():
        assert error("model=tiny", "verifiers=reward_model", out) == (
            2,
            "verify-report: verifiers.reward_model.path: missing value "
            "(set it: verifiers.reward_model.path=...)",
        )
    if (VERIFIERS / "combined.yaml").exists():  # its parts are not run: named, not a traceback
        assert "combined" in error("model=tiny", "verifiers=combined", out)[1]
    assert not (tmp_path / "r").exists()


def test_cli_dispatch(tmp_path):
    proc = run_cli(["verify-report", "model=tiny", "verifiers=nope", f"out={tmp_path}"], check=False)
    assert proc.returncode == 2 and "available: " in proc.stderr.strip().splitlines()[-1]
    assert "verify-report" in run_cli(["--help"]).stdout
