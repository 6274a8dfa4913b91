"""RL rewards: TTRL's majority vote (2504.16084) and EMPO's share (2504.05812) on a hand-checked sheet
of answers, RENT's negative entropy (2505.22660), RandomCalculation's graded reward on the paper's
values (2507.10532), and the EMA teacher on the tiny model: one batched call, from the EMA weights,
whose majority the rewards follow."""

import pytest
import torch
from conftest import cfg_of
from hydra.utils import instantiate

from selfimprove.engine import Engine
from selfimprove.stages import Context
from selfimprove.verify import (
    EMATeacher,
    GradedReward,
    MajorityAgreement,
    MajorityVoteReward,
    NegativeEntropy,
    graded_reward,
)

SHEET = [7, 7, 3, None, 7, 3]  # by hand: majority 7 (share .5); EMPO shares .5, .5, 1/3, 0, .5, 1/3


pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")  # each test's engines start afresh


def _rows(answers, prompt="p0", **extra):
    return [{"prompt_id": prompt, "sample_idx": i, "answer": a, **extra} for i, a in enumerate(answers)]


def test_ttrl_and_empo_on_the_sheet():
    rows = _rows(SHEET)
    assert MajorityVoteReward().score(rows) == [1, 1, 0, 0, 1, 0]
    assert MajorityAgreement().score(rows) == pytest.approx([0.5, 0.5, 1 / 3, 0, 0.5, 1 / 3])


def test_ttrl_votes_per_prompt_and_none_never_wins():
    rows = _rows([1, 2, 2]) + _rows([1, 1, 2], prompt="p1") + _rows([None, None], prompt="p2")
    assert MajorityVoteReward().score(rows) == [0, 1, 1, 1, 1, 0, 0, 0]
    assert MajorityVoteReward().score(_rows([5, 4])) == [1, 0]  # a tie goes to the first seen
    scored = MajorityVoteReward()(rows, None)
    assert [r["score/ttrl"] for r in scored] == [0, 1, 1, 1, 1, 0, 0, 0]


def test_rent_is_minus_the_mean_entropy_and_empty_gets_the_least_confident():
    rows = [{"entropy": e} for e in ([0.5, 1.5], [0.2], [], [3.0, 1.0, 2.0])]
    assert NegativeEntropy().score(rows) == pytest.approx([-1.0, -0.2, -2.0, -2.0])
    assert NegativeEntropy().score([{"entropy": []}]) == [0.0]  # nothing to compare with


def test_graded_reward_paper_values():
    assert graded_reward(10.5, 10) == pytest.approx(0.725, abs=1e-6)
    assert graded_reward(10, 10) == 1.0
    assert graded_reward(-3, 2) == 0.0
    assert graded_reward("10.5", "10") == pytest.approx(0.725, abs=1e-6)  # rows hold canonical text
    assert graded_reward("3/4", "0.75") == 1.0
    for bad in (None, "", "seven", "1/0", "nan", "inf"):
        assert graded_reward(bad, "2") == 0.0, bad
    with pytest.raises(ValueError, match="numeric targets"):
        graded_reward("2", "B")


def test_graded_scorer_reads_the_label():
    scorer = GradedReward()
    assert scorer.reads == ("answer", "target")
    rows = [{"answer": a, "target": "10"} for a in ("10.5", "10", None, "-3")]
    assert scorer.score(rows) == pytest.approx([0.725, 1.0, 0.0, 0.0])


@pytest.mark.parametrize(
    "name,cls", [("ttrl", MajorityVoteReward), ("rent", NegativeEntropy), ("graded", GradedReward)]
)
def test_configs_build(name, cls):
    cfg = cfg_of(f"+verifier@verifiers.{name}={name}")
    scorer = instantiate(cfg.verifiers[name])
    assert isinstance(scorer, cls) and scorer.name == name


def test_ema_teacher_config_follows_the_sampler():
    cfg = cfg_of("+verifier@verifiers.ema_teacher=ema_teacher", "sampler.max_new_tokens=5")
    scorer = instantiate(cfg.verifiers.ema_teacher)
    assert isinstance(scorer, EMATeacher) and scorer.name == "ema_teacher"
    assert (scorer.n, scorer.temperature, scorer.max_new_tokens) == (8, 1.0, 5)


class WholeText:
    """A task whose answer is the completion itself: a random tiny model rarely writes numbers."""

    def extract_answer(self, completion):
        return completion or None


class Recording:
    """A real engine whose generate calls are recorded."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompts, weights="policy", **gen):
        self.calls.append((prompts, weights, gen))
        return self.engine.generate(prompts, weights=weights, **gen)


def _greedy(engine, prompts, weights):
    outs = engine.generate(prompts, weights=weights, greedy=True, max_new_tokens=4)
    return [o["completion"] or None for o in outs]


def test_ema_teacher_labels_come_from_the_ema():
    engine = Engine(cfg_of("ema.enabled=true"), train=False)
    torch.manual_seed(0)
    for t in engine.ema.shadow.values():  # the EMA now differs from the policy (LoRA: B too)
        t.add_(torch.randn_like(t) * 2.0)
    tok = engine.tokenizer
    prompts = [tok("What is 2 + 3?")["input_ids"], tok("Say something.")["input_ids"]]
    teacher, policy = _greedy(engine, prompts, "ema"), _greedy(engine, prompts, "policy")
    assert all(t != p for t, p in zip(teacher, policy))  # else the test could not tell them apart

    rows = []
    for k, (p, ids) in enumerate(zip(("p0", "p1"), prompts)):
        for j, a in enumerate([teacher[k], policy[k], None]):
            rows.append({"prompt_id": p, "sample_idx": j, "prompt_ids": ids, "answer": a})
    # near-greedy: every teacher sample is the EMA's greedy completion, so the majority is known
    scorer = EMATeacher(n=3, temperature=1e-4, max_new_tokens=4)
    spy = Recording(engine)
    ctx = Context(spy, WholeText(), seed=7)
    scores = scorer.score(rows, ctx)
    expected = [
        float(a is not None and a == teacher[k]) for k in range(2) for a in (teacher[k], policy[k], None)
    ]
    assert scores == expected and set(scores) <= {0.0, 1.0} and sum(scores) == 2

    ((sent, weights, gen),) = spy.calls  # one call for the unit, all repeats in prompt order
    assert weights == "ema" and sent == [prompts[0]] * 3 + [prompts[1]] * 3
    assert gen["max_new_tokens"] == 4 and gen["seed"] == Context(None, None, seed=7).rng(
        "ema_teacher"
    ).randrange(2**31)
    assert _greedy(engine, prompts, "policy") == policy  # the policy's own weights came back

    again = scorer(rows, Context(Recording(engine), WholeText(), seed=7))
    assert [r["score/ema_teacher"] for r in again] == expected


def test_ema_teacher_without_ema_says_how_to_enable_it():
    engine = Engine(cfg_of("ema.enabled=false"), train=False)
    rows = [{"prompt_id": "p0", "sample_idx": 0, "prompt_ids": [1, 2, 3], "answer": "5"}]
    with pytest.raises(ValueError, match="ema.enabled=true"):
        EMATeacher(n=2)(rows, Context(engine, WholeText(), seed=0))
