"""Contract 3: the objectives on completion log-probs — hand values, gradients, the normalisations,
mixing, and collate's columns."""

import math

import pytest
import torch

from selfimprove.objectives import SFT, Mix, PolicyGradient, clipped_surrogate, k3
from selfimprove.select import GroupAdvantage, agreement
from selfimprove.select.advantage import group_advantages
from selfimprove.stages import Context
from selfimprove.train import collate


def test_group_advantages_hand_values():  # by hand: mean .5, unbiased std .5774 (as trl); RLOO 1 − 1/3
    rewards = [1, 0, 0, 1]
    assert group_advantages(rewards, "grpo") == pytest.approx([0.8660, -0.8660, -0.8660, 0.8660], abs=2e-4)
    assert group_advantages(rewards, "rloo") == pytest.approx([0.6667, -0.6667, -0.6667, 0.6667], abs=1e-4)
    assert group_advantages(rewards, "drgrpo") == pytest.approx([0.5, -0.5, -0.5, 0.5])
    assert group_advantages([3, 3, 3], "grpo") == [0.0, 0.0, 0.0]  # no signal in an all-equal group
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(rewards, "ppo")


def test_k3_hand_value():
    assert k3(torch.tensor(-1.0), torch.tensor(-1.5)).item() == pytest.approx(0.10653, abs=1e-5)
    assert k3(torch.tensor(-2.0), torch.tensor(-2.0)).item() == 0.0


def test_clip_stops_the_gradient_past_the_trust_region():
    logp = torch.tensor([0.0, 0.0], requires_grad=True)
    old = torch.tensor([-0.5, 0.0])  # ratio e^0.5 = 1.65 for the first token, 1 for the second
    loss, clipped = clipped_surrogate(logp, old, torch.tensor([1.0, 1.0]), clip_eps=0.2)
    loss.sum().backward()
    assert clipped.tolist() == [True, False]
    assert logp.grad[0] == 0 and logp.grad[1] == pytest.approx(-1.0)
    # a negative advantage is not clipped when the ratio is above 1 + eps: the loss still pushes it down
    _, clipped = clipped_surrogate(logp.detach(), old, torch.tensor([-1.0, -1.0]), clip_eps=0.2)
    assert clipped.tolist() == [False, False]


def _batch(advantages=(1.0, -0.5), lengths=(3, 2), seed=0, columns=("advantage", "logprobs")):
    """Two rows of a 2-token prompt and `lengths` completion tokens; their completion log-probs as a
    leaf [2, 3] (what the update's forward hands an objective) and the batch collate builds."""
    g = torch.Generator().manual_seed(seed)
    rows = [
        {"prompt_ids": [1, 2], "completion_ids": [5] * n, "advantage": a, "logprobs": [-1.0] * n}
        for a, n in zip(advantages, lengths)
    ]
    batch = collate(rows, columns)
    logps = (-torch.rand(2, max(lengths), generator=g, dtype=torch.float64)).requires_grad_(True)
    return rows, batch, logps


@pytest.mark.parametrize("normalize", ["sequence", "token", "constant"])
def test_policy_gradient_matches_the_hand_derived_gradient(normalize):
    # One step on fresh samples (π_old = π): the loss is −Σ A·log π(y_t) / normaliser, so each token's
    # log-prob gets −A / normaliser, divided by its row's length for "sequence". Rows: A = 1 over 3
    # tokens, A = −0.5 over 2; normalisers 2 sequences, 5 tokens, 2 × 6.
    rows, batch, logps = _batch(columns=("advantage",))
    objective = PolicyGradient(normalize=normalize, constant_length=6)
    loss, metrics = objective(logps, batch, objective.normalizer(rows))
    loss.backward()
    want = {
        "sequence": [[-1 / 6, -1 / 6, -1 / 6], [0.5 / 4, 0.5 / 4, 0]],
        "token": [[-1 / 5] * 3, [0.5 / 5, 0.5 / 5, 0]],
        "constant": [[-1 / 12] * 3, [0.5 / 12, 0.5 / 12, 0]],
    }[normalize]
    torch.testing.assert_close(logps.grad, torch.tensor(want, dtype=torch.float64))
    total, count = metrics["pg/ratio"]
    assert count == 5 and total == pytest.approx(5.0)  # on-policy: ρ = 1 on each of the 5 tokens


def test_policy_gradient_ratio_uses_the_recorded_logprobs():
    rows, batch, logps = _batch()  # recorded log-probs −1 everywhere
    loss, metrics = PolicyGradient(clip_eps=10.0)(logps, batch, 2.0)
    ratio = torch.exp(logps.detach() + 1.0)
    mask = batch["completion"]
    assert metrics["pg/ratio"][0].item() == pytest.approx(ratio[mask].sum().item())
    # −Σ_rows A_r/len_r Σ_t ρ_t / 2 sequences, unclipped (ε = 10)
    want = -(1.0 * ratio[0, :3].sum() / 3 - 0.5 * ratio[1, :2].sum() / 2) / 2
    assert loss.item() == pytest.approx(want.item())


def test_policy_gradient_matches_finite_differences_with_clip_and_kl():
    rows, batch, logps = _batch(seed=3)
    batch["ref_logprobs"] = batch["logprobs"] - 0.3 * batch["completion"]
    objective = PolicyGradient(beta=0.1, clip_eps=0.2)

    def loss(x):
        return objective(x, batch, 2.0)[0]

    loss(logps).backward()
    direction = torch.randn(logps.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-6
    numeric = (loss(logps.detach() + h * direction) - loss(logps.detach() - h * direction)) / (2 * h)
    assert (logps.grad * direction).sum().item() == pytest.approx(numeric.item(), rel=1e-5, abs=1e-9)
    assert logps.grad[1, 2] == 0  # past the second row's completion


def test_kl_needs_its_column_and_objectives_declare_what_they_read():
    _, batch, logps = _batch()
    with pytest.raises(KeyError, match="reference_base"):
        PolicyGradient(beta=0.1)(logps, batch, 2.0)
    assert PolicyGradient(beta=0.1, kl_to="ema").reads == ("advantage", "ema_logprobs")
    assert PolicyGradient().reads == ("advantage",)


def test_micro_batches_and_the_step_normalizer_give_the_whole_batch_loss():
    rows, batch, logps = _batch(lengths=(3, 1))
    for objective in (PolicyGradient(normalize="sequence"), SFT(), SFT(normalize="sequence")):
        norm = objective.normalizer(rows)
        whole, _ = objective(logps, batch, norm)
        parts = [collate([r], ("advantage", "logprobs")) for r in rows]
        split = sum(
            objective(logps[i : i + 1, : p["completion"].shape[1]], p, norm)[0] for i, p in enumerate(parts)
        )
        assert split.item() == pytest.approx(whole.item())


def test_mix_weights_each_part_by_its_own_normalizer():
    rows, batch, logps = _batch(columns=("advantage",))  # no recorded log-probs: on-policy
    pg, sft = PolicyGradient(normalize="sequence"), SFT()
    mix = Mix({"pg": pg, "sft": sft}, {"pg": 1.0, "sft": 0.5})
    assert mix.normalizer(rows) == {"pg": 2.0, "sft": 5.0}
    loss, metrics = mix(logps, batch, mix.normalizer(rows))
    mask = batch["completion"]
    # pg on-policy (ρ = 1): −Σ_r A_r / 2 sequences = −(1 − 0.5) / 2; sft: −Σ log π / 5 tokens
    pg_want = -0.25
    sft_want = -logps[mask].sum() / 5
    assert loss.item() == pytest.approx(pg_want + 0.5 * sft_want.item())
    assert "sft/nll" in metrics and "pg/ratio" in metrics
    with pytest.raises(ValueError, match="weights"):
        Mix({"pg": pg}, {"sft": 1.0})
    with pytest.raises(ValueError, match="temperature"):
        Mix({"pg": pg, "sft": SFT(temperature=2.0)}, {"pg": 1.0, "sft": 1.0})


def test_sft_is_the_token_mean_nll_and_weights_scale_rows():
    rows, batch, logps = _batch()
    loss, m = SFT()(logps, batch, 5.0)
    assert loss.item() == pytest.approx(-logps[batch["completion"]].sum().item() / 5)
    assert m["sft/nll"][1] == 5
    weighted = collate([{**rows[0], "weight": 2.0}, {**rows[1], "weight": 0.0}], ("weight",))
    loss, _ = SFT()(logps, weighted, 5.0)
    assert loss.item() == pytest.approx(-2 * logps[0, :3].sum().item() / 5)


def test_collate_aligns_token_columns_with_the_completions():
    rows = [
        {"prompt_ids": [5, 6, 7], "completion_ids": [8, 9], "logprobs": [-0.1, -0.2], "advantage": 2.0},
        {"prompt_ids": [5], "completion_ids": [4, 3, 2], "logprobs": [-1.0, -2.0, -3.0], "advantage": -1.0},
    ]
    batch = collate(rows, ("logprobs", "advantage", "ref_logprobs", "weight"))
    assert batch["completion"].tolist() == [[True, True, False], [True, True, True]]
    torch.testing.assert_close(batch["logprobs"], torch.tensor([[-0.1, -0.2, 0], [-1.0, -2.0, -3.0]]))
    assert batch["advantage"].tolist() == [2.0, -1.0]  # a per-row number, under its own name
    assert "ref_logprobs" not in batch and "weight" not in batch  # only the columns every row has
    # scope "sequence": every token but the first is scored, the completion at its end
    seq = collate(rows, ("logprobs",), scope="sequence")
    assert seq["completion"].tolist() == [[False, False, True, True], [True, True, True, False]]
    assert seq["logprobs"][0].tolist() == pytest.approx([0, 0, -0.1, -0.2])


def _rows(answers_by_prompt, rewards_by_prompt):
    return [
        {"prompt_id": p, "sample_idx": i, "answer": a, "score/r": r}
        for p, (answers, rewards) in enumerate(zip(answers_by_prompt, rewards_by_prompt))
        for i, (a, r) in enumerate(zip(answers, rewards))
    ]


def test_group_advantage_gates_and_orders_prompts_by_agreement():
    assert agreement([7, 7, 3, None, 7, 3]) == 0.5  # majority 7 is 3 of 6: SRT's 0.6 gate drops it
    rows = _rows(
        [[7, 7, 3, None, 7, 3], [1, 1, 1, 2, 1, 1], [4, 5, 6, 7, 8, 9]],
        [[1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0]],
    )
    stage, ctx = GroupAdvantage("r", min_agreement=0.6), Context(None, None, seed=0)
    kept = stage(rows, ctx)
    assert {r["prompt_id"] for r in kept} == {1}
    assert ctx.logged["prompts_kept"] == pytest.approx(1 / 3)
    # rewards 1,1,1,0,1,1: mean 5/6, sample std 0.4082: (1 − 5/6)/0.4082 = 0.4082, (0 − 5/6)/(0.4082 + 1e-4) = −2.0407
    assert [r["advantage"] for r in kept] == pytest.approx(
        [0.4082, 0.4082, 0.4082, -2.0407, 0.4082, 0.4082], abs=2e-4
    )
    stage = GroupAdvantage("r", easiest_fraction=0.34, drop_zero=False)
    assert {r["prompt_id"] for r in stage(rows)} == {1}  # the most self-consistent third
    stage, ctx = GroupAdvantage("r", estimator="rloo"), Context(None, None, seed=0)
    kept = stage(rows, ctx)
    assert {r["prompt_id"] for r in kept} == {0, 1}  # prompt 2's all-zero rewards teach nothing
    assert ctx.logged["zero_advantage_groups"] == pytest.approx(1 / 3)
    rows[0]["score/r"] = -math.inf  # an empty completion's log-likelihood: the group's worst, not nan
    assert all(math.isfinite(r["advantage"]) for r in GroupAdvantage("r")(rows))


def test_surprisal_rewards_answers_other_prompts_do_not_give():
    from selfimprove.select.advantage import cross_prompt_surprisal
    from selfimprove.select.filters import by_prompt

    # prompt 0's "11" is also prompt 1's answer (prompt-independent), its "56" belongs to it alone
    rows = _rows([[56, 11, 11, None], [11, 11, 12, 11]], [[0, 0, 0, 0], [0, 0, 0, 0]])
    surprisal = cross_prompt_surprisal(rows, by_prompt(rows))
    assert surprisal[0] == pytest.approx(math.log(5 / 1))  # none of the 4 other samples say 56
    assert surprisal[1] == pytest.approx(math.log(5 / 4))  # 3 of them say 11
    assert surprisal[3] == 0.0 and surprisal[6] == pytest.approx(math.log(5 / 1))
    stage = GroupAdvantage("r", surprisal_weight=1.0)
    kept = {(r["prompt_id"], r["sample_idx"]): r["advantage"] for r in stage(rows)}
    assert kept[(0, 0)] > kept[(0, 1)] > kept[(0, 3)]


def test_a_batch_baseline_pushes_a_unanimous_group_off_a_shared_answer():
    """Three prompts: one unanimous on "11" (which another prompt gives too), one unanimous on its own
    "56", one split. With the group baseline both unanimous groups teach nothing (dropped); with the
    batch's, each row gets λ·(its group's mean surprisal − the batch's) on top, by hand."""
    from selfimprove.select.advantage import cross_prompt_surprisal
    from selfimprove.select.filters import by_prompt

    rows = _rows([[11, 11], [56, 56], [11, 7]], [[0, 0], [0, 0], [1, 0]])
    assert {r["prompt_id"] for r in GroupAdvantage("r", surprisal_weight=0.5)(rows)} == {2}
    s = cross_prompt_surprisal(rows, by_prompt(rows))  # M = 4 other samples each
    assert s[0] == pytest.approx(math.log(5 / 2)) and s[2] == pytest.approx(math.log(5))
    batch_mean = sum(s) / 6
    stage = GroupAdvantage("r", estimator="drgrpo", surprisal_weight=0.5, surprisal_baseline="batch")
    got = {(r["prompt_id"], r["sample_idx"]): r["advantage"] for r in stage(rows)}
    assert got[(0, 0)] == got[(0, 1)] == pytest.approx(0.5 * (s[0] - batch_mean)) and got[(0, 0)] < 0
    assert got[(1, 0)] == pytest.approx(0.5 * (s[2] - batch_mean)) and got[(1, 0)] > 0
    # the split group: its drgrpo advantage of reward + λ·surprisal, plus its offset
    rewards = [1 + 0.5 * s[4], 0 + 0.5 * s[5]]
    between = 0.5 * ((s[4] + s[5]) / 2 - batch_mean)
    assert got[(2, 0)] == pytest.approx(rewards[0] - sum(rewards) / 2 + between)
    with pytest.raises(ValueError, match="surprisal_baseline"):
        GroupAdvantage("r", surprisal_baseline="prompt")
