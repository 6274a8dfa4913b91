import pytest
import torch
import torch.nn.functional as F

from selfimprove.objectives import SFT, masked_nll


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 6, 9, generator=g, requires_grad=True)
    labels = torch.randint(0, 9, (2, 6), generator=g)
    labels[0, :3] = -100  # prompt
    labels[1, :2] = -100
    labels[1, 5] = -100  # padding
    return logits, labels


def test_masked_nll_matches_cross_entropy():
    logits, labels = _batch()
    loss_sum, n = masked_nll(logits, labels)
    want = [
        F.cross_entropy(logits[b, t - 1], labels[b, t], reduction="sum")
        for b in range(2)
        for t in range(1, 6)
        if labels[b, t] != -100
    ]
    assert n.item() == len(want) == 6
    assert loss_sum.item() == pytest.approx(torch.stack(want).sum().item(), rel=1e-6)
    flat = F.cross_entropy(logits[:, :-1].reshape(-1, 9), labels[:, 1:].reshape(-1))
    assert (loss_sum / n).item() == pytest.approx(flat.item(), rel=1e-6)
    loss_sum.backward()
    assert logits.grad[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_micro_batches_sum_to_whole_batch():
    logits, labels = _batch(1)
    whole_sum, whole_n = masked_nll(logits, labels)
    parts = [masked_nll(logits[i : i + 1], labels[i : i + 1]) for i in range(2)]
    assert sum(p[0] for p in parts).item() == pytest.approx(whole_sum.item(), rel=1e-6)
    assert sum(p[1] for p in parts).item() == whole_n.item()


def test_all_masked_and_bf16():
    logits, labels = _batch()
    loss_sum, n = masked_nll(logits, torch.full_like(labels, -100))
    assert n.item() == 0 and loss_sum.item() == 0.0
    loss_sum.backward()  # must not fail on an empty micro-batch
    lb = logits.detach().to(torch.bfloat16)
    loss_sum, _ = masked_nll(lb, labels)
    assert loss_sum.dtype == torch.float32
    ref, _ = masked_nll(lb.float(), labels)
    assert loss_sum.item() == pytest.approx(ref.item(), rel=1e-6)


def test_sft_objective():
    logits, labels = _batch()
    loss_sum, normalizer, metrics = SFT()(logits, {"labels": labels})
    assert SFT.name == "sft"
    assert torch.equal(loss_sum, masked_nll(logits, labels)[0]) and normalizer == 6  # token-mean
    nll_sum, n_tokens = metrics["sft/nll"]
    assert n_tokens.item() == 6.0 and not nll_sum.requires_grad
