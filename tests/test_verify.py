import math

import pytest
import torch

from selfimprove.sampling.decode import token_stats
from selfimprove.select import borda_vote
from selfimprove.verify import (
    GroundTruth,
    MajorityAgreement,
    SelfCertainty,
    SequenceLogLik,
    response_logits,
)


def test_self_certainty_hand_values():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]))
    log_probs, sc, ent = token_stats(logits + 7.0)  # shift-invariant
    assert sc[0].item() == pytest.approx(0.056633, abs=1e-6)
    assert sc[1].item() == pytest.approx(0.0, abs=1e-6)
    assert ent[0].item() == pytest.approx(1.5 * math.log(2), abs=1e-6)
    assert ent[1].item() == pytest.approx(math.log(3), abs=1e-6)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(2))


def test_token_stats_fp32_shapes_and_masked_logits():
    logits = torch.randn(2, 5, 11).to(torch.bfloat16)
    log_probs, sc, ent = token_stats(logits)
    assert log_probs.dtype == torch.float32 and log_probs.shape == (2, 5, 11)
    assert sc.shape == ent.shape == (2, 5)
    assert (sc >= 0).all()
    # a -inf logit: entropy stays finite (0 * log 0 = 0); KL(U||p) is infinite by definition
    _, sc, ent = token_stats(torch.tensor([[0.0, 0.0, -math.inf]]))
    assert ent.item() == pytest.approx(math.log(2), abs=1e-6)
    assert math.isinf(sc.item())


def _toy_lm(weights: torch.Tensor, seq: list[int]) -> torch.Tensor:
    """Next-token logits after prefix ``seq``: depends on the last token and the length."""
    return weights[seq[-1]] + 0.3 * len(seq) * torch.arange(weights.shape[1]).float()


def test_response_logits_matches_stepwise_generation():
    torch.manual_seed(0)
    vocab, prompt, n = 7, [1, 4, 2], 4
    weights = torch.randn(vocab, vocab)
    seq = list(prompt)
    step_logits = []
    for _ in range(n):  # what generate() sees at each step
        logits = _toy_lm(weights, seq)
        step_logits.append(logits)
        seq.append(int(torch.argmax(logits)))
    # a full forward pass: position t holds the logits predicting token t+1
    full = torch.stack([_toy_lm(weights, seq[: t + 1]) for t in range(len(seq))])[None]
    sliced = response_logits(full, len(prompt), n)
    assert sliced.shape == (1, n, vocab)
    assert torch.equal(sliced[0], torch.stack(step_logits))
    direct_sc = token_stats(torch.stack(step_logits))[1].mean()
    assert token_stats(sliced)[1].mean().item() == pytest.approx(direct_sc.item(), abs=1e-6)
    # the reference code's [:, L:] slice is off by one and gets a different answer
    buggy = full[:, len(prompt) :]
    assert not torch.equal(buggy[0, : n - 1], sliced[0, : n - 1])
    with pytest.raises(ValueError):
        response_logits(full, len(prompt), n + 2)
    with pytest.raises(ValueError):
        response_logits(full, 0, 1)


def test_self_certainty_scorer():
    rows = [{"self_certainty": [0.2, 0.4]}, {"self_certainty": []}]
    assert SelfCertainty().score(rows) == pytest.approx([0.3, 0.0])
    assert SelfCertainty.name == "self_certainty" and not SelfCertainty.needs_reference


# Ranked by score: B (0.9) r1, A (0.8) r2, C (0.5) r3, A (0.1) r4; weights (N − r + 1)^p give the
# totals A = 3^p + 1, B = 4^p, C = 2^p. Equal at p = 1 (4 = 4): B, seen first, wins there and above,
# A just below (p = 0.99: 3.967 > 3.945). Index 1 is A's earliest output, index 0 B's.
@pytest.mark.parametrize(("power", "winner"), [(0.0, 1), (0.5, 1), (0.99, 1), (1.0, 0), (1.01, 0), (1.2, 0)])
def test_borda_methods_cases(power, winner):
    answers, sc = ["B", "A", "A", "C"], [0.9, 0.8, 0.1, 0.5]
    assert borda_vote(answers, sc, power) == winner


def test_borda_none_and_ties():
    # None never wins even when it is the most confident and most common
    assert borda_vote([None, None, "x"], [0.9, 0.8, 0.1], 0.0) == 2
    # equal totals: the answer seen first wins, and its earliest output is returned
    assert borda_vote(["a", "b", "a", "b"], [0.1, 0.2, 0.1, 0.2], 0.0) == 0
    assert borda_vote([None, None], [0.1, 0.5], 1.0) == 1
    with pytest.raises(ValueError):
        borda_vote([], [], 0.5)


def test_sequence_loglik():
    rows = [
        {"logprobs": [-1.0, -1.0], "ref_logprobs": [-0.5, -1.5, -1.0]},
        {"logprobs": [], "ref_logprobs": []},
    ]
    base = SequenceLogLik()
    assert base.name == "loglik_base" and base.needs_reference
    assert base.score(rows) == [-3.0, -math.inf]
    mean = SequenceLogLik(normalize=True)
    assert mean.name == "loglik_base_mean"
    assert mean.score(rows)[0] == pytest.approx(-1.0)
    pol = SequenceLogLik(source="policy", normalize=True)
    assert pol.name == "loglik_policy_mean" and not pol.needs_reference
    assert pol.score(rows)[0] == pytest.approx(-1.0)
    with pytest.raises(KeyError):
        SequenceLogLik().score([{"logprobs": [-1.0]}])
    with pytest.raises(ValueError):
        SequenceLogLik(source="ref")


def test_majority_agreement():
    rows = [
        {"prompt_id": "p", "answer": "1"},
        {"prompt_id": "p", "answer": "1"},
        {"prompt_id": "p", "answer": "2"},
        {"prompt_id": "p", "answer": None},
        {"prompt_id": "q", "answer": "1"},
    ]
    assert MajorityAgreement().score(rows) == pytest.approx([0.5, 0.5, 0.25, 0.0, 1.0])


def test_ground_truth():
    assert GroundTruth().score([{"correct": True}, {"correct": False}]) == [1.0, 0.0]
    assert GroundTruth.name == "correct"
