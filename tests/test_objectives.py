"""Contract 3: the policy-gradient objective's hand values, its gradient, the normalisations, mixing,
and collate's token-aligned columns."""

import math

import pytest
import torch

from selfimprove.objectives import SFT, Mix, PolicyGradient, clipped_surrogate, group_advantages, k3
from selfimprove.select import GroupAdvantage, agreement
from selfimprove.train import collate


def test_group_advantages_hand_values():  # METHODS.md §13
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


def _batch(advantages=(1.0, -0.5), lengths=(3, 2), vocab=7, seed=0):
    """Two sequences of a 2-token prompt and `lengths` completion tokens, as collate builds them."""
    g = torch.Generator().manual_seed(seed)
    rows = [
        {
            "prompt_ids": [1, 2],
            "completion_ids": torch.randint(0, vocab, (n,), generator=g).tolist(),
            "advantage": a,
            "logprobs": [-1.0] * n,
        }
        for a, n in zip(advantages, lengths)
    ]
    batch = collate(rows, pad=0)
    logits = torch.randn(2, batch["input_ids"].shape[1], vocab, generator=g, dtype=torch.float64)
    return rows, batch, logits.requires_grad_(True)


@pytest.mark.parametrize("normalize", ["sequence", "token", "constant"])
def test_policy_gradient_matches_the_hand_derived_gradient(normalize):
    # One step on fresh samples (π_old = π): the loss is −Σ A·log π(y_t) / normaliser, whose gradient
    # with respect to the logits predicting y_t is −A·(onehot(y_t) − softmax) / (normaliser·[len]).
    rows, batch, logits = _batch()
    batch.pop("old_logprobs")  # on-policy: the ratio is 1 at the current weights
    objective = PolicyGradient(normalize=normalize, constant_length=6)
    loss_sum, normalizer, metrics = objective(logits, batch)
    (loss_sum / normalizer).backward()
    want = torch.zeros_like(logits)
    width = logits.shape[1]
    total = {"sequence": 2, "token": 5, "constant": 2 * 6}[normalize]
    for i, row in enumerate(rows):
        n = len(row["completion_ids"])
        for k, token in enumerate(row["completion_ids"]):
            t = width - n + k - 1  # the position whose logits predict this token
            p = torch.softmax(logits[i, t].detach(), -1)
            onehot = torch.nn.functional.one_hot(torch.tensor(token), p.numel())
            scale = total * (n if normalize == "sequence" else 1)
            want[i, t] = -row["advantage"] * (onehot - p) / scale
    torch.testing.assert_close(logits.grad, want)
    assert metrics["pg/ratio"][0] / metrics["pg/ratio"][1] == pytest.approx(1.0)


def test_policy_gradient_matches_finite_differences_with_clip_and_kl():
    rows, batch, logits = _batch(seed=3)
    batch["ref_logprobs"] = batch["old_logprobs"] - 0.3 * (batch["labels"] != -100)
    objective = PolicyGradient(beta=0.1, clip_eps=0.2)

    def loss(x):
        loss_sum, normalizer, _ = objective(x, batch)
        return loss_sum / normalizer

    loss(logits).backward()
    direction = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-6
    numeric = (loss(logits.detach() + h * direction) - loss(logits.detach() - h * direction)) / (2 * h)
    assert (logits.grad * direction).sum().item() == pytest.approx(numeric.item(), rel=1e-5, abs=1e-9)


def test_kl_needs_its_column_and_objectives_declare_what_they_read():
    _, batch, logits = _batch()
    with pytest.raises(KeyError, match="reference_base"):
        PolicyGradient(beta=0.1)(logits, batch)
    assert PolicyGradient(beta=0.1, kl_to="ema").reads == ("advantage", "ema_logprobs")
    assert PolicyGradient().reads == ("advantage",)


def test_micro_batches_and_the_step_normalizer_give_the_whole_batch_loss():
    rows, batch, logits = _batch(lengths=(3, 1))
    for objective in (PolicyGradient(normalize="sequence"), SFT(), SFT(normalize="sequence")):
        whole, norm, _ = objective(logits, batch)
        parts = [collate([r], pad=0) for r in rows]
        total = objective.normalizer(parts)
        assert norm == total
        split = sum(
            objective(logits[i : i + 1, -p["input_ids"].shape[1] :], p)[0] for i, p in enumerate(parts)
        )
        assert (split / total).item() == pytest.approx((whole / norm).item())


def test_mix_weights_each_part_by_its_own_normalizer():
    _, batch, logits = _batch()
    pg, sft = PolicyGradient(normalize="sequence"), SFT()
    mix = Mix({"pg": pg, "sft": sft}, {"pg": 1.0, "sft": 0.5})
    assert mix.normalizer([batch]) == 1.0
    loss, _, metrics = mix(logits, batch)
    want = pg(logits, batch)[0] / 2 + 0.5 * sft(logits, batch)[0] / 5
    assert loss.item() == pytest.approx(want.item())
    assert "sft/nll" in metrics and "pg/ratio" in metrics
    with pytest.raises(ValueError, match="weights"):
        Mix({"pg": pg}, {"sft": 1.0})


def test_sft_temperature_trains_a_flatter_softmax():
    _, batch, logits = _batch()
    cold, _, _ = SFT(temperature=1.0)(logits, batch)
    hot, _, m = SFT(temperature=2.0)(logits, batch)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    want = -torch.log_softmax(logits[:, :-1][mask] / 2, -1).gather(1, labels[mask][:, None]).sum()
    assert hot.item() == pytest.approx(want.item()) and hot.item() != pytest.approx(cold.item())
    assert m["sft/nll"][1] == 5


def test_collate_aligns_token_columns_with_the_labels():
    rows = [
        {"prompt_ids": [5, 6, 7], "completion_ids": [8, 9], "logprobs": [-0.1, -0.2], "advantage": 2.0},
        {"prompt_ids": [5], "completion_ids": [4, 3, 2], "logprobs": [-1.0, -2.0, -3.0], "advantage": -1.0},
    ]
    batch = collate(rows, pad=0)
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, -100, 4, 3, 2]]
    want_old = torch.tensor([[0, 0, 0, -0.1, -0.2], [0, 0, -1.0, -2.0, -3.0]])
    torch.testing.assert_close(batch["old_logprobs"], want_old)
    assert batch["advantages"].tolist() == [[0, 0, 0, 2, 2], [0, 0, -1, -1, -1]]
    assert "ref_logprobs" not in batch and "weights" not in batch  # only the columns every row has
    with pytest.raises(ValueError, match="logprobs: 1 values for 2"):
        collate([{**rows[0], "logprobs": [-0.1]}], pad=0)


def _rows(answers_by_prompt, rewards_by_prompt):
    return [
        {"prompt_id": p, "sample_idx": i, "answer": a, "score/r": r}
        for p, (answers, rewards) in enumerate(zip(answers_by_prompt, rewards_by_prompt))
        for i, (a, r) in enumerate(zip(answers, rewards))
    ]


def test_group_advantage_gates_and_orders_prompts_by_agreement():
    assert agreement([7, 7, 3, None, 7, 3]) == 0.5  # METHODS.md §14: a 0.6 gate drops this prompt
    rows = _rows(
        [[7, 7, 3, None, 7, 3], [1, 1, 1, 2, 1, 1], [4, 5, 6, 7, 8, 9]],
        [[1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0]],
    )
    stage = GroupAdvantage("r", min_agreement=0.6)
    kept = stage(rows)
    assert {r["prompt_id"] for r in kept} == {1}
    assert stage.metrics["prompts_kept"] == pytest.approx(1 / 3)
    assert [r["advantage"] for r in kept] == pytest.approx(group_advantages([1, 1, 1, 0, 1, 1]))
    stage = GroupAdvantage("r", easiest_fraction=0.34, drop_zero=False)
    assert {r["prompt_id"] for r in stage(rows)} == {1}  # the most self-consistent third
    stage = GroupAdvantage("r", estimator="rloo")
    kept = stage(rows)
    assert {r["prompt_id"] for r in kept} == {0, 1}  # prompt 2's all-zero rewards teach nothing
    assert stage.metrics["zero_advantage_groups"] == pytest.approx(1 / 3)
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
