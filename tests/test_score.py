"""SCoRe (Kumar et al. 2409.12917): the shaping bonus's hand values, the stage rewards and advantages, the
first-attempt KL coefficient, the self-correction metrics, the two-attempt rollout on the tiny model,
and the schedule that switches Stage I to Stage II."""

import math

import pytest
import torch
from conftest import cfg_of

from selfimprove.config import ConfigError, schedule, scheduled, validate_targets
from selfimprove.engine import Engine
from selfimprove.metrics import edit_distance, eval_summary, self_correction
from selfimprove.objectives import PolicyGradient
from selfimprove.rollout import TwoAttempts
from selfimprove.select import SCoRe, shaped_reward
from selfimprove.stages import Context
from selfimprove.train import collate

CTX = Context(None, None, seed=0)

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")  # each test's engines start afresh


def test_shaping_hand_values():  # r2 + α(r2 − r1) at the paper's α = 10
    assert shaped_reward(1, 0, 10) == -10
    assert shaped_reward(0, 1, 10) == 11
    assert shaped_reward(1, 1, 10) == 1 and shaped_reward(0, 0, 10) == 0


def _episodes(pairs, prompt="p0"):
    """Rows of two-attempt episodes with the given (r1, r2) rewards, turn 1 then turn 2 per sample."""
    rows = []
    for i, (r1, r2) in enumerate(pairs):
        rows.append({"prompt_id": prompt, "sample_idx": i, "turn": 1, "score/correct": float(r1)})
        rows.append({"prompt_id": prompt, "sample_idx": i, "turn": 2, "score/correct": float(r2)})
    return rows


def test_stage_rewards_and_advantages_per_attempt_group():
    rows = _episodes([(1, 0), (0, 1), (0, 0), (1, 1)])
    # Stage I: no reward for the first attempt, the second's own reward
    assert SCoRe(stage=1).rewards(rows) == [0, 0, 0, 1, 0, 0, 0, 1]
    # Stage II: both, the second shaped: (1,0) → −10, (0,1) → 11, (0,0) → 0, (1,1) → 1
    assert SCoRe(stage=2).rewards(rows) == [1, -10, 0, 11, 0, 0, 1, 1]
    out = SCoRe(stage=2, estimator="rloo")(rows, CTX)
    first = [r["advantage"] for r in out if r["turn"] == 1]
    second = [r["advantage"] for r in out if r["turn"] == 2]
    # RLOO within each attempt's group: r − mean of the other three
    assert first == pytest.approx([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3])
    assert second == pytest.approx([-10 - 4, 11 - (-3), 0 - 2 / 3, 1 - 1 / 3])
    stage1 = SCoRe(stage=1)(rows, CTX)
    assert [r["turn"] for r in stage1] == [1, 2] * 4  # the second attempts' group has a signal
    assert all(r["advantage"] == 0 for r in stage1 if r["turn"] == 1)  # no reward gradient to y1
    # a rewarded group whose advantages are all 0 is skipped; Stage I keeps first attempts (their KL)
    flat = _episodes([(1, 0), (0, 0)]) + _episodes([(1, 1), (0, 1)], prompt="p1")
    kept = SCoRe(stage=1)(flat, CTX)
    assert [(r["prompt_id"], r["turn"]) for r in kept] == [("p0", 1), ("p0", 1), ("p1", 1), ("p1", 1)]
    assert len(SCoRe(stage=1, drop_zero=False)(flat, CTX)) == 8
    settled = _episodes([(1, 0), (0, 0)]) + _episodes([(1, 1), (1, 1)], prompt="p1")  # p1: nothing to learn
    kept = SCoRe(stage=2)(settled, CTX)
    assert [(r["prompt_id"], r["turn"]) for r in kept] == [("p0", 1), ("p0", 2)] * 2
    with pytest.raises(ValueError, match="two-attempt"):
        SCoRe(stage=1)([{k: v for k, v in r.items() if k != "turn"} for r in rows], CTX)
    with pytest.raises(ValueError, match="stage"):
        SCoRe(stage=3)


def test_first_attempt_kl_coefficient():
    """Zero advantages leave only β·k3 per token, k3 = e^d − d − 1 with d = ref − logp: first attempts
    weigh first_turn_beta, second attempts beta; normalize=token divides by the step's 4 tokens."""
    logps = [[-0.5, -1.5], [-0.2, -3.0]]
    refs = [[-1.0, -2.0], [-0.7, -2.5]]  # each row its own, so a row mix-up shows
    rows = [
        {"prompt_ids": [1, 2], "completion_ids": [3, 4], "advantage": 0.0, "turn": t, "ref_logprobs": ref}
        for t, ref in zip((1, 2), refs)
    ]
    objective = PolicyGradient(beta=0.01, first_turn_beta=0.1, normalize="token")
    assert "turn" in objective.reads and "ref_logprobs" in objective.reads
    batch = collate(rows, (*objective.reads, *objective.optional))
    loss, _ = objective(torch.tensor(logps), batch, objective.normalizer(rows))

    def k3(lp: float, ref: float) -> float:
        return math.exp(ref - lp) - (ref - lp) - 1

    want = sum(
        beta * k3(lp, ref) for beta, lps, rs in zip((0.1, 0.01), logps, refs) for lp, ref in zip(lps, rs)
    )
    assert loss.item() == pytest.approx(want / 4, rel=1e-6)


def test_self_correction_metrics_hand_values():
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "ab") == 2
    rows = []
    for i, (c1, c2, y1, y2) in enumerate(
        [(0, 1, "12", "13"), (1, 0, "7", "8"), (1, 1, "5", "5"), (0, 0, "1", "22")]
    ):
        first = {"prompt_id": "p", "sample_idx": i, "turn": 1, "correct": bool(c1), "completion": y1}
        rows += [
            first,
            {
                **first,
                "turn": 2,
                "correct": bool(c2),
                "completion": y2,
                "first_correct": bool(c1),
                "first_completion": y1,
            },
        ]
    m = self_correction(rows)
    assert m["accuracy_t1"] == 0.5 and m["accuracy_t2"] == 0.5 and m["delta"] == 0
    assert m["delta_i2c"] == 0.25 and m["delta_c2i"] == 0.25
    assert m["edit_distance"] == (1 + 1 + 0 + 2) / 4
    # held-out accuracy is the final attempt's
    summary = eval_summary(rows, [], 0)
    assert summary["accuracy"] == 0.5 and summary["delta_i2c"] == 0.25
    assert self_correction([{"correct": True}]) == {}


def test_two_attempt_rollout_on_the_tiny_model():
    cfg = cfg_of(recipe="score")
    engine = Engine(cfg, train=False)
    from hydra.utils import instantiate

    task = instantiate(cfg.task)
    problems = [task.train_problem(i) for i in range(2)]
    rollout = TwoAttempts("Check it and answer again.")
    rows = rollout(
        Context(engine, task, seed=5),
        problems,
        3,
        dict(max_new_tokens=4, temperature=1.0, top_p=1.0, weights="policy"),
    )
    assert [r["turn"] for r in rows] == [1, 2] * 6
    assert len({tuple(r) for r in rows}) == 1  # the same columns in every row (one Parquet schema)
    for first, second in zip(rows[::2], rows[1::2]):
        assert (second["prompt_id"], second["sample_idx"]) == (first["prompt_id"], first["sample_idx"])
        assert second["first_completion"] == first["completion"]
        text = engine.tokenizer.decode(second["prompt_ids"])
        assert "Check it and answer again." in text and first["completion"] in text
        assert text.endswith(first["prefill"])  # the second answer starts with the same prefill
        assert len(second["logprobs"]) == len(second["completion_ids"])
    again = rollout(
        Context(engine, task, seed=5),
        problems,
        3,
        dict(max_new_tokens=4, temperature=1.0, top_p=1.0, weights="policy"),
    )
    assert [r["completion_ids"] for r in again] == [r["completion_ids"] for r in rows]  # seeded


def test_schedule_picks_stages_and_refuses_bad_entries():
    cfg = cfg_of(recipe="score")
    entries = schedule(cfg)
    assert [e.name for e in entries] == ["stage1", "stage2"]
    last = entries[0].until_round
    assert scheduled(entries, 1).name == "stage1" and scheduled(entries, last).name == "stage1"
    assert scheduled(entries, last + 1).name == "stage2" and scheduled(entries, 99).name == "stage2"
    assert (
        entries[0].cfg.objective.first_turn_beta == 0.1 and entries[1].cfg.objective.first_turn_beta is None
    )
    assert entries[1].cfg.selector.stage == 2 and entries[1].cfg.selector.alpha == 10
    validate_targets(cfg)
    with pytest.raises(ConfigError, match=r"schedule\[0\]\.trainer"):
        schedule(cfg_of("+schedule.0.trainer={lr: 1}", recipe="score"))
    with pytest.raises(ConfigError, match=r"schedule\[1\]\.until_round"):
        schedule(cfg_of("schedule.1.until_round=9", recipe="score"))
    with pytest.raises(ConfigError, match=r"schedule\[0\]\.selector\.alpah"):
        schedule(cfg_of("+schedule.0.selector.alpah=3", recipe="score"))
    with pytest.raises(ConfigError, match="turn"):  # SCoRe without two-attempt rows: at config time
        validate_targets(cfg_of("rollout=one_turn", recipe="score"))
    assert math.isfinite(entries[0].until_round)
